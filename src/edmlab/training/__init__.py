"""Training with Lightning: the EDM LightningModule, EMA, callbacks (checkpoints, grids, final losses, progress)."""

from edmlab.training.checkpoint import Checkpoint
from edmlab.training.ema import EMA, PowerFunctionEMA, posthoc_coefficients, reconstruct_posthoc
from edmlab.training.fid import FIDCallback
from edmlab.training.final_losses import FinalLosses
from edmlab.training.module import EDMModule, LearningRate
from edmlab.training.progress import KimgProgress
from edmlab.training.samples import SampleGrid

__all__ = ["EDMModule", "LearningRate", "EMA", "PowerFunctionEMA", "posthoc_coefficients",
           "reconstruct_posthoc", "Checkpoint", "SampleGrid", "FIDCallback", "FinalLosses", "KimgProgress"]
