"""One import point for PyTorch Lightning, whichever distribution is installed.

`lightning` (the unified package) provides `lightning.pytorch`; older images (the GPU machine has
pytorch-lightning 2.6.6 only) provide `pytorch_lightning`. Both expose the same API, but a
LightningModule from one is not accepted by the other's Trainer, so every turbo_train module must take
Lightning from here:

    from turbo_train.lightning_compat import pl, Callback, rank_zero_only

Optional extras (webdataset, wandb, deepspeed) are NOT imported here: import them lazily where used,
after `has_module(name)`, so the on-the-fly data path and CSV logging work without them.
"""
from __future__ import annotations

import importlib.util

try:
    import lightning.pytorch as pl

    LIGHTNING_PACKAGE = "lightning"
except ImportError:  # pragma: no cover - exercised on images without the unified package
    try:
        import pytorch_lightning as pl

        LIGHTNING_PACKAGE = "pytorch_lightning"
    except ImportError as e:
        raise ImportError("turbo_train needs PyTorch Lightning: pip install lightning (or pytorch-lightning)") from e

Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
callbacks = pl.callbacks
loggers = pl.loggers
strategies = pl.strategies
seed_everything = pl.seed_everything
rank_zero_only = pl.utilities.rank_zero_only
rank_zero_info = pl.utilities.rank_zero_info
rank_zero_warn = pl.utilities.rank_zero_warn


def has_module(name: str) -> bool:
    """True if `name` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_global_zero() -> bool:
    """Rank 0 of the whole job, from the launcher's environment (before any Trainer exists)."""
    return getattr(rank_zero_only, "rank", 0) == 0


__all__ = [
    "pl", "LIGHTNING_PACKAGE", "Callback", "LightningModule", "LightningDataModule", "Trainer", "callbacks",
    "loggers", "strategies", "seed_everything", "rank_zero_only", "rank_zero_info", "rank_zero_warn",
    "has_module", "is_global_zero",
]
