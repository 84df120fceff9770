"""Latent shards: webdataset tar shards of precomputed latents (teacher samples or encoded videos),
read as a stream for flow matching and rCM without the VAE or the original videos (RCM.md §7).

Written by `turbo_train.synth`. One sample per key `<prefix>-IIIIIIII` (I = sample index), members
    latent.npy    float16/float32 (C, F, H, W): the clean latent x0 in the DiT's latent space
    context.npy   optional float16/float32 (n, D): the prompt's text states, cut after the last
                  non-zero row (states past a prompt's end are zero); padded back with zeros to
                  meta.json's "context_length". Absent: the trainer encodes "caption" itself.
    caption.txt   utf-8 prompt
    meta.json     {"index": I, "shard_size": samples in this shard, "context_length": L (with
                  context.npy), "source": "teacher" | "toy_codec", ...generation settings}

Reading reuses the toy shards' stages (`toyworld/shards.py`): shard list repeated and reshuffled per
pass identically on every rank -> split_by_node -> split_by_worker -> tar reader that logs, counts
and skips the rest of a corrupted or truncated shard -> per-(seed, rank, worker) shuffle buffer ->
decode here (a bad sample is logged, counted and skipped). Batches (`collate_latents`):
    {"latent": (B, C, F, H, W), "context": (B, L, D) (only when every sample has one),
     "caption": [str], "key": [str]}
which `FlowMatchingModule` and `RCMModule` consume as they are (context first, else caption).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable

import numpy as np
import torch
import webdataset as wds

from turbo_train.toyworld.datamodule import CountedShardDataModule
from turbo_train.toyworld.shards import SkipCounter, _ReadShards, _ShardSource, _ShuffleSamples, list_shards

REQUIRED_MEMBERS = ("latent.npy", "caption.txt", "meta.json")
LATENT_DTYPES = (np.float16, np.float32)
ShardSource = str | os.PathLike | Iterable[str]


# ----------------------------------------------------------------------------- one sample


def _load_npy(raw: dict, member: str) -> np.ndarray:
    arr = np.load(io.BytesIO(raw[member]), allow_pickle=False)
    if arr.dtype not in LATENT_DTYPES:
        raise ValueError(f"sample {raw.get('__key__')!r}: {member} must be float16 or float32, got {arr.dtype}")
    return arr


def decode_latent_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> {"key", "latent" (C, F, H, W), "context" (L, D) if stored, "caption", "meta"}
    (tensors keep the stored dtype). Raises ValueError on a missing member or a bad shape/dtype."""
    missing = [k for k in REQUIRED_MEMBERS if k not in raw]
    if missing:
        raise ValueError(f"sample {raw.get('__key__')!r} of {raw.get('__url__')!r} lacks {missing}")
    key = raw["__key__"]
    latent = _load_npy(raw, "latent.npy")
    if latent.ndim != 4:
        raise ValueError(f"sample {key!r}: latent must be (C, F, H, W), got shape {latent.shape}")
    meta = json.loads(raw["meta.json"])
    if not isinstance(meta, dict):
        raise ValueError(f"sample {key!r}: meta.json must be a JSON object, got {type(meta).__name__}")
    out = {"key": key, "latent": torch.from_numpy(latent), "caption": raw["caption.txt"].decode("utf-8"),
           "meta": meta}
    if "context.npy" in raw:
        ctx = _load_npy(raw, "context.npy")
        length = int(meta.get("context_length", ctx.shape[0] if ctx.ndim == 2 else -1))
        if ctx.ndim != 2 or ctx.shape[0] > length:
            raise ValueError(f"sample {key!r}: context must be (n, D) with n <= context_length={length}, "
                             f"got shape {ctx.shape}")
        ctx = torch.from_numpy(ctx)
        if ctx.shape[0] < length:  # zero rows past the prompt's end were cut when written
            ctx = torch.cat([ctx, ctx.new_zeros(length - ctx.shape[0], ctx.shape[1])])  # (L, D)
        out["context"] = ctx
    return out


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch: {"latent": (B, C, F, H, W), "context": (B, L, D) when every sample carries one,
    "caption": [str], "key": [str]}. Raises ValueError when latent or context shapes differ."""
    if not samples:
        raise ValueError("collate_latents: empty batch")
    shapes = {tuple(s["latent"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate_latents: latents of one batch must share a shape, got {sorted(shapes)} "
                         f"(keys {[s['key'] for s in samples]})")
    batch = {"latent": torch.stack([s["latent"] for s in samples]),
             "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    if all("context" in s for s in samples):
        shapes = {tuple(s["context"].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"collate_latents: contexts of one batch must share a shape, got {sorted(shapes)}")
        batch["context"] = torch.stack([s["context"] for s in samples])
    return batch


# ----------------------------------------------------------------------------- the stream


def latent_shard_pipeline(
    urls: ShardSource,
    *,
    counter: SkipCounter,
    shuffle_buffer: int = 1000,
    shuffle_shards: bool = True,
    repeat: bool = False,
    seed: int = 0,
) -> wds.DataPipeline:
    """Stream decoded latent samples (see `decode_latent_sample`) from tar shards.

    urls: a directory (every *.tar in it, sorted), a brace pattern or a list of paths.
    counter: where skipped shards/samples are counted (shared with DataLoader workers).
    shuffle_buffer: samples held for shuffling (<= 1: none). shuffle_shards: reshuffle the shard order
    per pass. repeat: True streams forever (step-based training). seed: shard and sample shuffling.
    """
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
    shard_list = list_shards(urls)
    return wds.DataPipeline(
        _ShardSource(shard_list, shuffle_shards, seed, repeat),
        wds.split_by_node,
        wds.split_by_worker,
        _ReadShards(counter, give_up_after=len(shard_list) if repeat else None, required=REQUIRED_MEMBERS),
        _ShuffleSamples(shuffle_buffer, seed),
        wds.map(decode_latent_sample, handler=counter.skip_sample),
    )


# ----------------------------------------------------------------------------- Lightning DataModule


class LatentShardDataModule(CountedShardDataModule):
    """Latent batches (`collate_latents`) for training and validation.

    train_shards: a shard directory, brace pattern or list of .tar paths (read endlessly, reshuffled
        each pass, unless train_repeat is False). val_shards: read once in order; None = no validation.
    batch_size: samples per batch per rank. num_workers: DataLoader processes per rank (0 = main).
    shuffle_buffer: samples held by each worker's shuffle buffer (training only; 0 = none).
    seed: shard and sample shuffle seed. pin_memory: pin batches (GPU runs).
    multiprocessing_context: DataLoader worker start method (None = platform default).
    Skipped (corrupted/truncated) shards and undecodable samples: `skipped_shards`, `skipped_samples`.
    """

    collate = staticmethod(collate_latents)

    def __init__(self, train_shards: ShardSource, val_shards: ShardSource | None = None, *, batch_size: int = 8,
                 num_workers: int = 2, shuffle_buffer: int = 1000, seed: int = 0, train_repeat: bool = True,
                 pin_memory: bool = False, multiprocessing_context: str | None = None):
        if train_shards is None:
            raise ValueError("LatentShardDataModule.train_shards is required (a directory, brace pattern or list)")
        super().__init__(train_shards, val_shards, batch_size=batch_size, num_workers=num_workers,
                         shuffle_buffer=shuffle_buffer, seed=seed, train_repeat=train_repeat, pin_memory=pin_memory,
                         multiprocessing_context=multiprocessing_context)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = latent_shard_pipeline(self.train_shards, counter=self.counter,
                                               shuffle_buffer=self.shuffle_buffer, repeat=self.train_repeat,
                                               seed=self.seed)
        if self.val_shards is not None:
            self.val_set = latent_shard_pipeline(self.val_shards, counter=self.counter, shuffle_buffer=0,
                                                 shuffle_shards=False, repeat=False, seed=self.seed)
