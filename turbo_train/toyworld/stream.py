"""On-the-fly toy videos as a torch IterableDataset (no shards), and the batch collate shared with
the shard DataModule. Needs only numpy and torch, so the judge trains without lightning or
webdataset installed.

Sample numbering: the stream hands global sample index i to rank r, worker w when
i % (world * workers) == r * workers + w, and sample i is `generate_sample(sample_seed(seed, i,
split))` -- the same videos `write_shards(seed=seed, split=split)` writes, split across ranks and
workers without overlap, deterministic for a given world size and worker count.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .attributes import HEADS, attributes_to_labels
from .generator import SPLITS, generate_sample, sample_seed


def worker_slot() -> tuple[int, int]:
    """(global worker id, global worker count) over distributed ranks x DataLoader workers. Rank and
    world size come from torch.distributed when initialised, else the RANK/WORLD_SIZE variables."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class ToyVideoStream(IterableDataset):
    """Toy videos generated as they are read.

    seed: dataset seed (with `split`, names the videos; use different seeds for train and held-out).
    split: "train" or "eval": the seed namespace and the caption templates.
    num_samples: None streams forever (for step-based training); an int gives a finite set
        (indices 0..num_samples-1), e.g. a fixed validation set.
    start: first sample index (skip what a resumed run has already seen).
    """

    def __init__(self, seed: int = 0, split: str = "train", num_samples: int | None = None, start: int = 0):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_samples is not None and int(num_samples) < 1:
            raise ValueError(f"num_samples must be None or >= 1, got {num_samples}")
        if int(start) < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.seed, self.split, self.num_samples, self.start = int(seed), split, num_samples, int(start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = worker_slot()
        i = self.start + (slot - self.start) % slots  # first index >= start owned by this slot
        while self.num_samples is None or i < self.num_samples:
            s = generate_sample(sample_seed(self.seed, i, self.split), split=self.split)
            yield {
                "key": f"{self.split}-{i:08d}",
                "video": torch.from_numpy(s.video),
                "caption": s.caption,
                "attributes": s.attributes,
                "labels": attributes_to_labels(s.attributes),
            }
            i += slots


def collate_toy(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch: {"video": uint8 (B, F, H, W, 3), "caption": [str], "attributes": [dict], "key": [str],
    "labels": {head: int64 (B,)}} (labels per judge head, -1 where absent)."""
    if not samples:
        raise ValueError("collate_toy: empty batch")
    return {
        **collate_video_caption(samples),
        "attributes": [s["attributes"] for s in samples],
        "labels": {h: torch.tensor([s["labels"][h] for s in samples], dtype=torch.long) for h in HEADS},
    }


def collate_video_caption(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The DiT training batch: {"video": uint8 (B, F, H, W, 3), "caption": [str], "key": [str]} only.
    Ground-truth attributes and judge labels stay behind: Lightning walks every nested container of a
    batch on each step (device transfer, batch-size inference), and B attribute dicts cost milliseconds."""
    if not samples:
        raise ValueError("collate_video_caption: empty batch")
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }
