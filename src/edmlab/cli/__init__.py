"""Hydra entry points behind the repository's train.py (and sample.py)."""

from edmlab.cli.resolvers import register as _register_resolvers

_register_resolvers()
