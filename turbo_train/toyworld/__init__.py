"""The embedded toy world: procedural captioned videos, their shards and DataModule, the judge
(a small video classifier) and the metrics it scores generations with.

    attributes.py  vocabularies (SHAPES, COLORS, MOTIONS, BACKGROUNDS), scene sampling, label codes
    generator.py   rendering, generate_sample(seed) -> ToySample(video, caption, attributes)
    captions.py    caption_for (train / held-out eval templates), parse_caption
    shards.py      write_shards, shard_pipeline (webdataset; skips and counts corrupted shards)
    stream.py      ToyVideoStream (on-the-fly IterableDataset), collate_toy
    datamodule.py  ToyVideoDataModule (Lightning)
    judge.py       Judge, train_judge, CLI `python -m turbo_train.toyworld.judge`
    metrics.py     prompt_adherence, per_attribute_accuracy, frechet_distance, diversity

Importing this package loads only numpy-level modules; the torch/lightning/webdataset ones load
on first use of their names.
"""
from .attributes import BACKGROUNDS, COLORS, HEADS, MOTIONS, SHAPES, sample_attributes
from .captions import HELD_OUT_TEMPLATES, TEMPLATES, caption_for, parse_caption
from .generator import ToySample, generate_sample, render, sample_seed

_LAZY = {
    "write_shards": "shards",
    "shard_pipeline": "shards",
    "SkipCounter": "shards",
    "ToyVideoStream": "stream",
    "collate_toy": "stream",
    "ToyVideoDataModule": "datamodule",
    "Judge": "judge",
    "JudgeConfig": "judge",
    "load_judge": "judge",
    "train_judge": "judge",
    "prompt_adherence": "metrics",
    "per_attribute_accuracy": "metrics",
    "frechet_distance": "metrics",
    "diversity": "metrics",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKGROUNDS", "COLORS", "HEADS", "MOTIONS", "SHAPES", "sample_attributes",
    "HELD_OUT_TEMPLATES", "TEMPLATES", "caption_for", "parse_caption",
    "ToySample", "generate_sample", "render", "sample_seed", *_LAZY,
]
