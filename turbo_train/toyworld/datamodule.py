"""Lightning DataModule for toy videos: streams webdataset shards (`shards.py`) or, with no shards
given, generates videos on the fly (`stream.ToyVideoStream`).

Batches are `stream.collate_toy` dicts: "video" uint8 (B, F, H, W, 3), "caption", "attributes",
"key", "labels" (with labels=False only "video", "caption", "key": the DiT's batch). Training streams never end (shards are re-read pass after pass, reshuffled):
bound the run with `max_steps`. Validation is one finite pass. Shards and samples skipped for
corruption are counted in `skipped_shards` / `skipped_samples` (summed over DataLoader workers).
"""
from __future__ import annotations

import os
from typing import Iterable

from turbo_train.lightning_compat import LightningDataModule
from torch.utils.data import DataLoader

from .shards import SkipCounter, shard_pipeline
from .stream import ToyVideoStream, collate_toy, collate_video_caption

ShardSource = str | os.PathLike | Iterable[str]


class CountedShardDataModule(LightningDataModule):
    """What a shard-streaming DataModule shares (toy videos here, latents in turbo_train.latent_shards):
    argument checks, the skip counters of corrupted shards/samples (summed over workers), and the
    DataLoaders. Subclasses set `collate` and build `train_set` / `val_set` in `setup` (a None
    `val_set` after setup = no validation)."""

    collate = None  # batch collate function (a staticmethod in subclasses)

    def __init__(self, train_shards, val_shards, *, batch_size: int, num_workers: int, shuffle_buffer: int,
                 seed: int, train_repeat: bool, pin_memory: bool, multiprocessing_context: str | None,
                 extra_checks: tuple = ()):
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0), ("seed", seed, 0), *extra_checks):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{type(self).__name__}.{name} must be an int >= {low}, got {value!r}")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.shuffle_buffer, self.seed = batch_size, num_workers, shuffle_buffer, seed
        self.train_repeat, self.pin_memory = train_repeat, pin_memory
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.counter = SkipCounter(self.multiprocessing_context)
        self.train_set = self.val_set = None

    @property
    def skipped_shards(self) -> int:
        """Shards cut short by corruption or truncation so far (all workers)."""
        return self.counter.shards

    @property
    def skipped_samples(self) -> int:
        """Undecodable samples skipped so far (all workers)."""
        return self.counter.samples

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          multiprocessing_context=self.multiprocessing_context)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader, or [] (no validation) where setup built no validation set."""
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set) if self.val_set is not None else []


class ToyVideoDataModule(CountedShardDataModule):
    """Toy video batches for training and validation.

    train_shards / val_shards: a shard directory, brace pattern or list of .tar paths; None
        generates videos on the fly instead (train: endless "train" split; val: the first
        `val_samples` videos of the "eval" split, i.e. held-out seeds and caption templates).
    batch_size: videos per batch per rank. num_workers: DataLoader processes per rank (0 = main).
    shuffle_buffer: samples held by each worker's shuffle buffer (training shards only).
    seed: dataset seed for on-the-fly videos and the shard/sample shuffling.
    val_samples: size of the on-the-fly validation set.
    train_repeat: False reads the training shards once (a finite epoch) instead of endlessly.
    multiprocessing_context: start method of the DataLoader workers ("fork", "spawn", ...; None =
        the platform default).
    labels: False batches only video, caption and key (`stream.collate_video_caption`: what a DiT
        trains on); True adds the attributes and judge labels (`stream.collate_toy`: the judge).
    """

    collate = staticmethod(collate_toy)

    def __init__(
        self,
        train_shards: ShardSource | None = None,
        val_shards: ShardSource | None = None,
        *,
        batch_size: int = 32,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_samples: int = 256,
        train_repeat: bool = True,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        labels: bool = True,
    ):
        super().__init__(train_shards, val_shards, batch_size=batch_size, num_workers=num_workers,
                         shuffle_buffer=shuffle_buffer, seed=seed, train_repeat=train_repeat, pin_memory=pin_memory,
                         multiprocessing_context=multiprocessing_context, extra_checks=(("val_samples", val_samples, 1),))
        self.val_samples = val_samples
        if not labels:
            self.collate = collate_video_caption

    def setup(self, stage: str | None = None) -> None:
        if self.train_shards is None:
            self.train_set = ToyVideoStream(seed=self.seed, split="train")
        else:
            self.train_set = shard_pipeline(self.train_shards, counter=self.counter, split="train",
                                            shuffle_buffer=self.shuffle_buffer, repeat=self.train_repeat, seed=self.seed)
        if self.val_shards is None:
            self.val_set = ToyVideoStream(seed=self.seed, split="eval", num_samples=self.val_samples)
        else:
            self.val_set = shard_pipeline(self.val_shards, counter=self.counter, split="eval",
                                          shuffle_buffer=0, shuffle_shards=False, repeat=False, seed=self.seed)
