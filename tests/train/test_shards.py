"""Toy video shards: round trip, shuffling, rank/worker splitting, and corrupted or truncated
shards skipped, logged and counted (never a crash, never silent)."""
import json
import logging
import tarfile

import numpy as np
import pytest
import torch

from turbo_train.toyworld.datamodule import ToyVideoDataModule
from turbo_train.toyworld.generator import generate_sample, sample_seed
from turbo_train.toyworld.shards import SkipCounter, list_shards, shard_pipeline, write_shards
from turbo_train.toyworld.stream import ToyVideoStream

SEED = 5


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, num_samples=10, samples_per_shard=4, seed=SEED, split="train", progress=False)
    return d


def _read(source, **kw):
    counter = SkipCounter()
    kw.setdefault("shuffle_buffer", 0)
    kw.setdefault("shuffle_shards", False)
    return list(shard_pipeline(source, counter=counter, **kw)), counter


def test_write_shards_layout(shard_dir):
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-shards.json"]  # no *.tmp left
    manifest = json.loads((shard_dir / "train-shards.json").read_text())
    assert manifest["num_samples"] == 10 and manifest["shards"] == names[:3]
    with tarfile.open(shard_dir / "train-000000.tar") as tar:
        members = sorted(tar.getnames())
    assert members[:4] == ["train-00000000.attributes.json", "train-00000000.caption.txt",
                           "train-00000000.meta.json", "train-00000000.video.npy"]
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(shard_dir / "x", 3, 0, seed=0)
    with pytest.raises(ValueError, match="split"):
        write_shards(shard_dir / "x", 3, 1, seed=0, split="test")


def test_shard_round_trip_matches_the_generator_and_the_stream(shard_dir):
    samples, counter = _read(shard_dir, split="train")
    assert [s["key"] for s in samples] == [f"train-{i:08d}" for i in range(10)]
    assert counter.shards == 0 and counter.samples == 0
    stream = list(ToyVideoStream(seed=SEED, split="train", num_samples=10))
    for i, (s, t) in enumerate(zip(samples, stream)):
        ref = generate_sample(sample_seed(SEED, i, "train"))
        assert s["video"].dtype == torch.uint8 and np.array_equal(s["video"].numpy(), ref.video)
        assert s["caption"] == ref.caption == t["caption"] and s["attributes"] == ref.attributes == t["attributes"]
        assert torch.equal(s["video"], t["video"]) and s["labels"] == t["labels"]


def test_shuffling_keeps_every_sample_and_is_seeded(shard_dir):
    a, _ = _read(shard_dir, split="train", shuffle_buffer=8, shuffle_shards=True, seed=1)
    b, _ = _read(shard_dir, split="train", shuffle_buffer=8, shuffle_shards=True, seed=1)
    keys = [s["key"] for s in a]
    assert sorted(keys) == [f"train-{i:08d}" for i in range(10)] and keys == [s["key"] for s in b]
    assert keys != sorted(keys)


def test_repeat_streams_pass_after_pass(shard_dir):
    counter = SkipCounter()
    it = iter(shard_pipeline(shard_dir, counter=counter, split="train", shuffle_buffer=0, repeat=True))
    keys = [next(it)["key"] for _ in range(25)]
    assert sorted(set(keys)) == [f"train-{i:08d}" for i in range(10)]


def test_split_by_rank_gives_disjoint_shards(shard_dir, monkeypatch):
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append({s["key"] for s in _read(shard_dir, split="train")[0]})
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 10


def test_list_shards_sources(shard_dir):
    assert len(list_shards(shard_dir, "train")) == 3
    assert list_shards(f"{shard_dir}/train-{{000000..000001}}.tar") == [str(shard_dir / "train-000000.tar"), str(shard_dir / "train-000001.tar")]
    with pytest.raises(ValueError, match="eval"):
        list_shards(shard_dir, "eval")


def _damaged_copy(shard_dir, tmp_path, damage):
    """Copy the shards, apply damage(path_of_shard_1)."""
    for p in shard_dir.glob("*.tar"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    damage(tmp_path / "train-000001.tar")
    return [str(tmp_path / f"train-{k:06d}.tar") for k in range(3)]


def _cut_at(fraction=None, member=None):
    """Truncate at a fraction of the file, or right before tar member number `member`."""
    def damage(path):
        data = path.read_bytes()
        if member is not None:
            with tarfile.open(path) as tar:
                cut = tar.getmembers()[member].offset
        else:
            cut = int(len(data) * fraction)
        path.write_bytes(data[:cut])
    return damage


# shard 1 holds samples 4..7 (4 members each); each damage cuts or spoils it at a different place
DAMAGES = {
    "cut mid-member": _cut_at(fraction=0.55),  # tar raises "unexpected end of data"
    "cut at a member boundary": _cut_at(member=2),  # tar raises nothing: caught as a half sample
    "cut between samples": _cut_at(member=4),  # sample 4 whole, 5-7 gone, no error: caught by shard_size
    "empty file": _cut_at(fraction=0.0),
    "garbage": lambda p: p.write_bytes(b"not a tar file " * 200),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_shard_is_skipped_logged_and_counted(shard_dir, tmp_path, caplog, damage):
    urls = _damaged_copy(shard_dir, tmp_path, DAMAGES[damage])
    with caplog.at_level(logging.WARNING, logger="turbo_train.toyworld.shards"):
        samples, counter = _read(urls)
    keys = {s["key"] for s in samples}
    intact = {f"train-{i:08d}" for i in (0, 1, 2, 3, 8, 9)}
    assert intact <= keys  # the other shards are read in full
    assert keys - intact <= {f"train-{i:08d}" for i in range(4, 8)}
    assert len(keys) < 10  # something of shard 1 was lost ...
    assert counter.shards == 1 and counter.samples == 0  # ... and it is counted once, as one shard
    assert "train-000001.tar" in caplog.text and "skipped" in caplog.text
    for s in samples:  # whatever came through is whole
        assert s["video"].shape == (8, 64, 64, 3)


def test_a_bad_sample_is_skipped_and_counted(tmp_path, caplog):
    import webdataset as wds

    path = tmp_path / "train-000000.tar"
    good = generate_sample(0)
    with wds.TarWriter(str(path)) as w:
        for i, video in enumerate([good.video, good.video[:4], good.video]):  # sample 1: wrong frame count
            w.write({"__key__": f"train-{i:08d}", "video.npy": video, "caption.txt": good.caption,
                     "attributes.json": good.attributes, "meta.json": {"shard_size": 3}})
    with caplog.at_level(logging.WARNING, logger="turbo_train.toyworld.shards"):
        samples, counter = _read([str(path)])
    assert [s["key"] for s in samples] == ["train-00000000", "train-00000002"]
    assert counter.samples == 1 and counter.shards == 0 and "train-00000001" in caplog.text


def test_datamodule_counts_skips_across_workers(shard_dir, tmp_path):
    urls = _damaged_copy(shard_dir, tmp_path, DAMAGES["garbage"])
    dm = ToyVideoDataModule(urls, batch_size=3, num_workers=2, train_repeat=False, shuffle_buffer=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["key"]) for b in batches) == 6
    b = batches[0]
    assert b["video"].dtype == torch.uint8 and b["video"].shape[1:] == (8, 64, 64, 3)
    assert set(b["labels"]) >= {"background", "obj1_color", "obj2_present"}
    assert dm.skipped_shards == 1 and dm.skipped_samples == 0  # counted in a worker, read in the main process


def test_datamodule_on_the_fly():
    dm = ToyVideoDataModule(batch_size=4, num_workers=0, val_samples=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 8, 64, 64, 3) and len(batch["caption"]) == 4
    val = list(dm.val_dataloader())
    assert [len(b["key"]) for b in val] == [4, 2] and val[0]["key"][0].startswith("eval-")
    with pytest.raises(ValueError, match="batch_size"):
        ToyVideoDataModule(batch_size=0)


def test_datamodule_without_labels_batches_video_caption_key(shard_dir):
    # what turbo-train's toy_shards source trains a DiT on: no attribute dicts or label tensors
    dm = ToyVideoDataModule(shard_dir, batch_size=2, num_workers=0, train_repeat=False, shuffle_buffer=0, labels=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"video", "caption", "key"}
    assert batch["video"].shape == (2, 8, 64, 64, 3) and len(batch["caption"]) == 2


def test_pipeline_works_in_spawned_workers(shard_dir, tmp_path):
    # spawn pickles the pipeline (stages and the shared counter) into the worker
    from torch.utils.data import DataLoader

    from turbo_train.toyworld.stream import collate_toy

    urls = _damaged_copy(shard_dir, tmp_path, DAMAGES["empty file"])
    counter = SkipCounter("spawn")
    pipe = shard_pipeline(urls, counter=counter, shuffle_buffer=4)
    loader = DataLoader(pipe, batch_size=4, num_workers=1, collate_fn=collate_toy, multiprocessing_context="spawn")
    assert sum(len(b["key"]) for b in loader) == 6 and counter.shards == 1


def test_an_endless_stream_over_unreadable_shards_raises(tmp_path):
    for k in range(2):
        (tmp_path / f"train-{k:06d}.tar").write_bytes(b"junk" * 100)
    counter = SkipCounter()
    with pytest.raises(RuntimeError, match="gave no sample"):
        next(iter(shard_pipeline(tmp_path, counter=counter, split="train", repeat=True)))
    assert counter.shards == 2


def test_turbo_train_fits_a_dit_on_toy_shards(shard_dir, tmp_path):
    """recipe data.source toy_shards end to end: two flow-matching steps of a tiny DiT on the shards."""
    from fakes import FakeTextEncoder

    from turbo_train import runner
    from turbo_train.methods.flow_matching import FlowMatchingModule
    from turbo_train.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "method": {"name": "flow_matching"},
        "model": {"preset": "toy", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1}},
        "data": {"source": "toy_shards", "train_shards": str(shard_dir), "batch_size": 2, "num_workers": 0,
                 "shuffle_buffer": 4},
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": 2, "val_every_n_steps": 0},
        "logging": {"run_dir": str(tmp_path / "run"), "wandb": False, "progress_bar": False},
        "checkpoint": {"every_n_steps": 0, "resume": None},
    })
    module = FlowMatchingModule(recipe, text_encoder=FakeTextEncoder(), export_dir=tmp_path / "run")
    trainer, module = runner.fit(recipe, tmp_path / "run", module=module)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
