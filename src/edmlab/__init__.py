"""edmlab: train and sample EDM denoisers under any noise process (FM, VP, VE, EDM)."""

__version__ = "0.1.0"
