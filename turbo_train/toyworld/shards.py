"""Toy videos as webdataset tar shards: the writer, and the streaming reader that skips (logs and
counts) corrupted or truncated shards instead of crashing.

Shard layout: `<out_dir>/<split>-NNNNNN.tar`, one sample per key `<split>-IIIIIIII` (I = sample
index) with members
    video.npy        uint8 (F=8, H=64, W=64, 3), numpy .npy
    caption.txt      utf-8 caption (split's templates)
    attributes.json  ground truth, see attributes.py
    meta.json        {"seed": sample seed, "index": I, "split": ..., "shard_size": samples in this shard}
and `<out_dir>/<split>-shards.json` listing the shards (written last). Sample I is
`generate_sample(sample_seed(seed, I, split), split=split)`, so shards and the on-the-fly stream
(`stream.ToyVideoStream`) hold the same videos. Each shard is written to `*.tar.tmp` and renamed.

Reading (`shard_pipeline`), a webdataset DataPipeline:
  shard list (repeated and reshuffled per pass, same order on every rank)
  -> split_by_node -> split_by_worker
  -> per shard: webdataset's tar reader; the first error ends the shard, which is logged and
     counted once; a shard that ends early without an error (cut at a member boundary: tar
     raises nothing) is caught by a last sample that lacks members, or by comparing the samples
     read with meta.json's shard_size; complete samples before the cut are kept
  -> shuffle buffer -> decode (a bad sample is logged, counted and skipped).
A rank or worker that gets no shard yields nothing (no empty check, like WebDataset's
empty_check=False). Counts live in a `SkipCounter` shared with DataLoader worker processes. An
endless (repeat) stream raises once as many shards in a row as the list holds gave no sample, for
it would otherwise spin forever.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from .attributes import attributes_to_labels, validate_attributes
from .generator import HEIGHT, NUM_FRAMES, SPLITS, WIDTH, generate_sample, sample_seed

log = logging.getLogger(__name__)
VIDEO_SHAPE = (NUM_FRAMES, HEIGHT, WIDTH, 3)
REQUIRED_MEMBERS = ("video.npy", "caption.txt", "attributes.json")


# ----------------------------------------------------------------------------- writing


def write_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int,
    seed: int,
    split: str = "train",
    *,
    progress: bool = True,
) -> list[Path]:
    """Generate `num_samples` toy videos into tar shards of `samples_per_shard` (last one shorter).

    Returns the shard paths. Existing shards of the same name are replaced."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(samples_per_shard) < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    bar = tqdm(total=num_samples, desc=f"toy shards ({split})", unit="video", disable=not progress)
    for first in range(0, num_samples, samples_per_shard):
        indices = range(first, min(first + samples_per_shard, num_samples))
        path = out / f"{split}-{len(paths):06d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for i in indices:
                s = sample_seed(seed, i, split)
                sample = generate_sample(s, split=split)
                sink.write(
                    {
                        "__key__": f"{split}-{i:08d}",
                        "video.npy": sample.video,
                        "caption.txt": sample.caption,
                        "attributes.json": sample.attributes,
                        "meta.json": {"seed": s, "index": i, "split": split, "shard_size": len(indices)},
                    }
                )
                bar.update(1)
        os.replace(tmp, path)
        paths.append(path)
    bar.close()
    manifest = {"split": split, "seed": int(seed), "num_samples": int(num_samples),
                "samples_per_shard": int(samples_per_shard), "shards": [p.name for p in paths]}
    tmp = out / f"{split}-shards.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / f"{split}-shards.json")
    return paths


def list_shards(source: str | os.PathLike | Iterable[str], split: str | None = None) -> list[str]:
    """Shard paths from a directory (its `<split>-shards.json`, else every `<split>-*.tar` /
    `*.tar` sorted), a brace pattern ("dir/train-{000000..000009}.tar") or a list of paths."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        d = Path(source)
        manifest = d / f"{split}-shards.json" if split else None
        if manifest is not None and manifest.exists():
            return [str(d / name) for name in json.loads(manifest.read_text())["shards"]]
        urls = sorted(str(p) for p in d.glob(f"{split}-*.tar" if split else "*.tar"))
        if not urls:
            raise ValueError(f"shards: no {'%s-' % split if split else ''}*.tar in directory {str(d)!r}")
        return urls
    if isinstance(source, (str, os.PathLike)):
        return wds.shardlists.expand_urls(str(source))
    urls = [str(u) for u in source]
    if not urls:
        raise ValueError("shards: empty list of shard paths")
    return urls


# ----------------------------------------------------------------------------- skip counting


class SkipCounter:
    """Counts skipped shards and samples across DataLoader worker processes (shared memory) and
    logs each skip with its reason. Read `shards` / `samples` from any process.

    context: the multiprocessing start method of the DataLoader that will read through this
    counter (its locks must come from the same one); None = the platform default, which is also
    the DataLoader's default."""

    def __init__(self, context: str | None = None):
        ctx = multiprocessing.get_context(context)
        self._shards = ctx.Value("q", 0)
        self._samples = ctx.Value("q", 0)

    @property
    def shards(self) -> int:
        return int(self._shards.value)

    @property
    def samples(self) -> int:
        return int(self._samples.value)

    def skip_shard(self, url: str, reason: str) -> None:
        with self._shards.get_lock():
            self._shards.value += 1
        log.warning("toy shards: skipped the rest of shard %s (%s); %d shard(s) skipped so far", url, reason, self.shards)

    def skip_sample(self, exn: BaseException) -> bool:
        """webdataset handler for per-sample errors: log, count, continue."""
        with self._samples.get_lock():
            self._samples.value += 1
        log.warning("toy shards: skipped a bad sample (%s: %s); %d sample(s) skipped so far", type(exn).__name__, exn, self.samples)
        return True


# ----------------------------------------------------------------------------- reading


class _ShardSource:
    """Stage 0: {"url": ...} dicts, pass after pass when `repeat`; the order of each pass is
    shuffled with (seed, pass), identically on every rank, so split_by_node partitions it.
    (Stages are small classes, not closures, so the pipeline pickles for spawned workers.)"""

    def __init__(self, urls: list[str], shuffle: bool, seed: int, repeat: bool):
        self.urls, self.shuffle, self.seed, self.repeat = urls, shuffle, seed, repeat

    def __call__(self) -> Iterator[dict]:
        epoch = 0
        while True:
            order = list(self.urls)
            if self.shuffle:
                random.Random(hash((self.seed, epoch))).shuffle(order)
            yield from ({"url": u} for u in order)
            epoch += 1
            if not self.repeat:
                return


class _ReadShards:
    """Stage: url dicts -> raw samples, one shard at a time through webdataset's tar reader."""

    def __init__(self, counter: SkipCounter, give_up_after: int | None = None,
                 required: tuple[str, ...] = REQUIRED_MEMBERS):
        self.counter = counter
        self.give_up_after = give_up_after  # consecutive unreadable shards before raising (None: never)
        self.required = tuple(required)  # members every complete sample has (latent shards name theirs)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        failures = 0
        for item in src:
            url = item["url"]
            errors: list[BaseException] = []

            def stop(exn: BaseException) -> bool:  # first error ends this shard
                errors.append(exn)
                return False

            seen, expected, pending = 0, None, None  # one sample held back: a shard's last may be partial
            for raw in wds.tariterators.tarfile_samples([{"url": url}], handler=stop):
                if errors:  # a partial sample flushed after the error: part of the cut
                    break
                if pending is not None:
                    yield pending
                pending, seen = raw, seen + 1
                if expected is None and "meta.json" in raw:
                    try:
                        expected = int(json.loads(raw["meta.json"])["shard_size"])
                    except Exception:  # noqa: BLE001  (the decode stage reports the bad sample)
                        pass
            stub = pending is not None and not all(k in pending for k in self.required)
            if stub:  # the member list stops mid-sample: the shard was cut there; drop the stub
                pending, seen = None, seen - 1
            cut = bool(errors) or stub or (expected is not None and seen < expected)
            if pending is not None:
                yield pending
            if errors:
                exn = errors[0]
                self.counter.skip_shard(url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
            elif cut:
                self.counter.skip_shard(url, f"truncated: {seen} of {expected} samples")
            elif seen == 0:
                self.counter.skip_shard(url, "no samples")
            failures = failures + 1 if seen == 0 else 0
            if self.give_up_after is not None and failures >= self.give_up_after:
                raise RuntimeError(f"toy shards: the last {failures} shards read gave no sample (last: {url}); "
                                   "an endless stream over unreadable shards would never yield")


class _ShuffleSamples:
    """Stage: webdataset's shuffle buffer, seeded per (seed, rank, worker) when iteration starts."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize, self.seed = bufsize, seed

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            return src
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(hash((self.seed, rank, worker)))
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> {"key", "video" uint8 torch (F, H, W, 3), "caption", "attributes", "labels"}.
    Raises ValueError on a missing member or a wrong video shape/dtype."""
    missing = [k for k in REQUIRED_MEMBERS if k not in raw]
    if missing:
        raise ValueError(f"sample {raw.get('__key__')!r} of {raw.get('__url__')!r} lacks {missing}")
    video = np.load(io.BytesIO(raw["video.npy"]), allow_pickle=False)
    if video.dtype != np.uint8 or video.shape != VIDEO_SHAPE:
        raise ValueError(f"sample {raw['__key__']!r}: video must be uint8 {VIDEO_SHAPE}, got {video.dtype} {video.shape}")
    attributes = validate_attributes(json.loads(raw["attributes.json"]))
    return {
        "key": raw["__key__"],
        "video": torch.from_numpy(video),
        "caption": raw["caption.txt"].decode("utf-8"),
        "attributes": attributes,
        "labels": attributes_to_labels(attributes),
    }


def shard_pipeline(
    urls: str | os.PathLike | Iterable[str],
    *,
    counter: SkipCounter,
    split: str | None = None,
    shuffle_buffer: int = 1000,
    shuffle_shards: bool = True,
    repeat: bool = False,
    seed: int = 0,
) -> wds.DataPipeline:
    """Stream decoded samples (see `decode_sample`) from tar shards.

    urls: a shard directory, brace pattern or list (see `list_shards`; `split` picks the split's
        shards in a directory). shuffle_buffer: samples held for shuffling (<= 1: no shuffling).
    repeat: True streams forever (each pass reshuffled), for step-based training.
    """
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    shard_list = list_shards(urls, split)
    return wds.DataPipeline(
        _ShardSource(shard_list, shuffle_shards, seed, repeat),
        wds.split_by_node,
        wds.split_by_worker,
        _ReadShards(counter, give_up_after=len(shard_list) if repeat else None),
        _ShuffleSamples(shuffle_buffer, seed),
        wds.map(decode_sample, handler=counter.skip_sample),
    )
