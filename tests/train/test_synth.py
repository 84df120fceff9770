"""`turbo-train synth` (turbo_train/synth.py) and the latent-shard reader (turbo_train/latent_shards.py):
teacher samples of a tiny random toy DiT written as N samples in K shards and read back as the same
tensors; resume (verified shards kept, bad ones remade, other settings refused); real toy videos
through the ToyCodec; truncated and corrupted shards skipped and counted; the CLI; and flow-matching
and rCM runs of 2 steps on `data.source: latent_shards`. CPU, seconds each."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

from turbo_infer.models.wan import WanModel, get_config
from turbo_infer.pipeline import TurboPipeline
from turbo_infer.vae import ToyCodec
from turbo_train import cli, runner
from turbo_train.latent_shards import (
    LatentShardDataModule,
    SkipCounter,
    collate_latents,
    latent_shard_pipeline,
)
from turbo_train.recipe import recipe_from_dict
from turbo_train.synth import encode_toy_videos, synthesize_teacher, trim_context, write_latent_shards
from fakes import run_cli

TINY = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2}
SIZE = {"num_frames": 2, "height": 32, "width": 32}  # latent (48, 2, 8, 8): 32 tokens
LATENT = (48, 2, 8, 8)
L_TEXT = 8
PROMPTS = ["a red circle moving left", "one blue square", "a green triangle going up on a checkered background"]


class FakeText:
    """Stand-in for MiniLM: one state row per word (seeded by the prompt's crc32), zeros after the
    prompt's end as the real encoder gives (so context trimming is exercised); '' gives zeros."""

    dim = 384

    def __init__(self):
        self.calls = 0

    def encode(self, prompts):
        self.calls += 1
        out = torch.zeros(len(prompts), L_TEXT, self.dim)
        for b, p in enumerate(prompts):
            n = min(len(p.split()), L_TEXT)
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            out[b, :n] = torch.randn(n, self.dim, generator=g)
        return out

    def empty_embedding(self):
        return self.encode([""])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on 2 shared cores: tests/conftest.py


def tiny_pipe() -> TurboPipeline:
    torch.manual_seed(0)
    model = WanModel(get_config("toy", **TINY)).eval()
    with torch.no_grad():  # zero-init head -> give it weights so samples depend on prompt and noise
        model.head.head.weight.normal_(std=0.05)
    return TurboPipeline(model, FakeText(), ToyCodec(), default_shift=3.0, fps=8)


def synth(pipe, out, num_samples=5, **kw):
    args = dict(num_samples=num_samples, samples_per_shard=2, steps=3, guidance=3.0, shift=3.0, seed=10,
                batch_size=2, progress=False, **SIZE)
    args.update(kw)
    return synthesize_teacher(pipe, out, PROMPTS, **args)


def read_all(urls, counter=None):
    counter = counter or SkipCounter()
    return list(latent_shard_pipeline(urls, counter=counter, shuffle_buffer=0, shuffle_shards=False)), counter


# ----------------------------------------------------------------------------- teacher synthesis


def test_teacher_synth_writes_n_samples_in_k_shards_and_reads_back_the_same_tensors(tmp_path):
    pipe = tiny_pipe()
    res = synth(pipe, tmp_path)  # 5 samples, 2 per shard -> 3 shards, batches of 2
    names = [p.name for p in res["shards"]]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert res["written"] == res["shards"] and res["kept"] == [] and res["manifest"].is_file()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))

    samples, counter = read_all(tmp_path)
    assert [s["key"] for s in samples] == [f"train-{i:08d}" for i in range(5)]
    assert counter.shards == 0 and counter.samples == 0
    for i, s in enumerate(samples):
        prompt = PROMPTS[i % len(PROMPTS)]
        assert s["caption"] == prompt and s["meta"]["index"] == i and s["meta"]["seed"] == 10 + i
        assert s["latent"].dtype == torch.float16 and tuple(s["latent"].shape) == LATENT
        # sample i alone, noise seed 10 + i, equals what the batched synthesis stored (fp16: <= 1 ulp apart)
        ref = pipe.generate_latents([prompt], steps=3, guidance=3.0, seed=10 + i, shift=3.0, progress=False, **SIZE)[0]
        assert ref.abs().max() > 0.5  # not a degenerate (all-zero) sample
        torch.testing.assert_close(s["latent"].float(), ref.half().float(), atol=1e-3, rtol=1e-3)
        # text states: trimmed on write, zero-padded back to L on read -> exactly the encoder's states
        assert torch.equal(s["context"], FakeText().encode([prompt])[0].half())
    # the uncond file rCM's method.rcm.uncond_path reads: the teacher's empty-prompt states
    from turbo_train.methods.rcm import load_uncond

    assert torch.equal(load_uncond(tmp_path / "uncond.safetensors"), FakeText().empty_embedding())

    # collated batches as the training modules consume them
    batch = collate_latents(samples[:2])
    assert batch["latent"].shape == (2, *LATENT) and batch["context"].shape == (2, L_TEXT, 384)
    assert batch["caption"] == PROMPTS[:2] and batch["key"] == ["train-00000000", "train-00000001"]


def test_trim_context_cuts_trailing_zero_rows_only():
    c = np.zeros((6, 3), np.float32)
    c[1, 2] = 1.0  # a zero row before the last non-zero one stays
    c[3, 0] = -2.0
    assert trim_context(c).shape == (4, 3) and np.array_equal(trim_context(c), c[:4])
    assert trim_context(np.zeros((5, 3), np.float32)).shape == (0, 3)


def test_resume_keeps_verified_shards_remakes_bad_ones_and_refuses_other_settings(tmp_path, caplog):
    pipe = tiny_pipe()
    synth(pipe, tmp_path)
    before = {s["key"]: s for s in read_all(tmp_path)[0]}
    shards = sorted(tmp_path.glob("train-*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated mid-member
    shards[2].unlink()  # missing
    stamp = shards[0].stat().st_mtime_ns

    made = []
    real = pipe.generate_latents
    pipe.generate_latents = lambda prompts, **kw: made.extend(prompts) or real(prompts, **kw)
    res = synth(pipe, tmp_path)
    assert [p.name for p in res["kept"]] == ["train-000000.tar"]
    assert [p.name for p in res["written"]] == ["train-000001.tar", "train-000002.tar"]
    assert len(made) == 3 and shards[0].stat().st_mtime_ns == stamp  # samples 2, 3, 4 only
    assert "remaking shard" in caplog.text and "train-000001.tar" in caplog.text
    after = {s["key"]: s for s in read_all(tmp_path)[0]}
    assert sorted(after) == sorted(before)
    for k in before:  # deterministic per sample index: the remade samples are the same tensors
        assert torch.equal(after[k]["latent"], before[k]["latent"]) and torch.equal(after[k]["context"], before[k]["context"])

    # more samples extend the set: the short last shard (sample 4) is remade with sample 5
    made.clear()
    res = synth(pipe, tmp_path, num_samples=6)
    assert [p.name for p in res["written"]] == ["train-000002.tar"] and len(made) == 2
    assert len(read_all(tmp_path)[0]) == 6

    # other settings in the same directory are refused, naming what differs
    with pytest.raises(ValueError, match=r"out_dir: .*other settings.*steps"):
        synth(pipe, tmp_path, steps=4)
    with pytest.raises(ValueError, match=r"out_dir: .*latent_dtype"):
        synth(pipe, tmp_path, latent_dtype="float32")


def test_bad_arguments_name_the_argument(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match="samples_per_shard"):
        synth(pipe, tmp_path / "a", samples_per_shard=0)
    with pytest.raises(ValueError, match="prefix"):
        synth(pipe, tmp_path / "b", prefix="my.data")
    with pytest.raises(ValueError, match="latent_dtype"):
        synth(pipe, tmp_path / "c", latent_dtype="bfloat16")
    with pytest.raises(ValueError, match="sampler"):
        synth(pipe, tmp_path / "d", sampler="ddim")
    with pytest.raises(ValueError, match="height"):
        synth(pipe, tmp_path / "e", height=30)
    with pytest.raises(ValueError, match="batch_size"):
        synth(pipe, tmp_path / "f", batch_size=0)


# ----------------------------------------------------------------------------- real toy videos


def test_toy_videos_through_the_codec_decode_to_the_generator_pixels(tmp_path):
    from turbo_train.toyworld.generator import generate_sample, sample_seed, video_to_uint8

    text = FakeText()
    res = encode_toy_videos(tmp_path, 5, 2, seed=3, split="eval", text_encoder=text, batch_size=3, progress=False)
    assert [p.name for p in res["shards"]] == ["eval-000000.tar", "eval-000001.tar", "eval-000002.tar"]
    samples, counter = read_all(tmp_path)
    assert len(samples) == 5 and counter.shards == 0
    for i, s in enumerate(samples):
        toy = generate_sample(sample_seed(3, i, "eval"), split="eval")
        assert s["key"] == f"eval-{i:08d}" and s["caption"] == toy.caption and s["meta"]["attributes"] == toy.attributes
        assert tuple(s["latent"].shape) == (48, 8, 16, 16) and s["latent"].dtype == torch.float16
        pixels = video_to_uint8(ToyCodec().decode(s["latent"].float()[None]))[0]  # (F, H, W, 3)
        assert torch.equal(pixels, torch.from_numpy(toy.video))  # fp16 latents round back exactly
        assert torch.equal(s["context"], text.encode([toy.caption])[0].half())
    # no text encoder: no context.npy, batches carry captions only
    encode_toy_videos(tmp_path / "nc", 2, 2, progress=False)
    batch = collate_latents(read_all(tmp_path / "nc")[0])
    assert "context" not in batch and len(batch["caption"]) == 2


def test_processes_split_the_shards_and_the_last_writes_the_list(tmp_path):
    r0 = encode_toy_videos(tmp_path, 5, 2, rank=0, world=2, progress=False)
    assert [p.name for p in r0["written"]] == ["train-000000.tar", "train-000002.tar"] and r0["manifest"] is None
    r1 = encode_toy_videos(tmp_path, 5, 2, rank=1, world=2, progress=False)
    assert [p.name for p in r1["written"]] == ["train-000001.tar"] and r1["manifest"].is_file()
    assert [s["meta"]["index"] for s in read_all(tmp_path)[0]] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="rank"):
        encode_toy_videos(tmp_path, 5, 2, rank=2, world=2, progress=False)


# ----------------------------------------------------------------------------- the reader


def test_truncated_and_corrupted_shards_are_skipped_and_counted(tmp_path, caplog):
    encode_toy_videos(tmp_path, 9, 3, progress=False)  # 3 shards of 3
    shards = sorted(tmp_path.glob("train-*.tar"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: int(len(data) * 0.55)])  # cut inside sample 1: sample 0 survives
    shards[2].write_bytes(os.urandom(5000))  # not a tar at all
    (tmp_path / "train-000003.tar.tmp").write_bytes(b"half-written")  # a crashed writer's leftover: not listed

    samples, counter = read_all(tmp_path)
    assert [s["meta"]["index"] for s in samples] == [0, 3, 4, 5]
    assert counter.shards == 2 and counter.samples == 0
    assert "train-000000.tar" in caplog.text and "train-000002.tar" in caplog.text

    # a shard cut exactly at a member boundary raises nothing in tar: caught by meta.json's shard_size
    import tarfile

    with tarfile.open(shards[1]) as tf:
        members = tf.getmembers()
    cut = members[4].offset  # sample 3 complete (4 members), sample 4 gone
    shards[1].write_bytes(shards[1].read_bytes()[:cut])
    dm = LatentShardDataModule([str(shards[1])], batch_size=8, num_workers=0, shuffle_buffer=0, train_repeat=False)
    batches = list(dm.train_dataloader())
    assert [b["key"] for b in batches] == [["train-00000003"]] and dm.skipped_shards == 1


def test_bad_sample_is_skipped_and_counted_and_collate_checks_shapes(tmp_path):
    def make(indices):
        return [{"latent": torch.zeros(4, 1, 2, 2) if i != 1 else torch.zeros(4, 1, 2, 3), "context": None,
                 "caption": f"p{i}", "meta": {}} for i in indices]

    with pytest.raises(RuntimeError, match="latent shape"):
        write_latent_shards(tmp_path / "x", 3, 3, make, settings={}, latent_shape=(4, 1, 2, 2), with_context=False,
                            progress=False)
    # a sample whose latent is not float16/32 (hand-written shard) is skipped, the rest kept
    import webdataset as wds

    path = tmp_path / "hand-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for i, arr in enumerate([np.zeros((4, 1, 2, 2), np.float16), np.zeros((4, 1, 2, 2), np.int32),
                                 np.ones((4, 1, 2, 2), np.float32)]):
            w.write({"__key__": f"hand-{i:08d}", "latent.npy": arr, "caption.txt": "p",
                     "meta.json": {"index": i, "shard_size": 3}})
    samples, counter = read_all([str(path)])
    assert [s["key"] for s in samples] == ["hand-00000000", "hand-00000002"]
    assert counter.samples == 1 and counter.shards == 0
    with pytest.raises(ValueError, match="share a shape"):
        collate_latents([{**samples[0], "latent": torch.zeros(4, 1, 2, 3)}, samples[1]])
    with pytest.raises(ValueError, match="empty batch"):
        collate_latents([])


# ----------------------------------------------------------------------------- CLI


def run_main(args, capsys):
    """cli.main(args) -> (exit code, stdout, stderr)."""
    return run_cli(cli.main, args, capsys)


def test_cli_synth_subcommand(tmp_path, capsys):
    code, out, _ = run_main(["synth", "--help"], capsys)
    assert code == 0 and "teacher" in out and "toy-videos" in out
    code, out, err = run_main(["synth", "toy-videos", "--out", str(tmp_path), "--num-samples", "3",
                               "--samples-per-shard", "2", "--no-context", "--no-progress"], capsys)
    assert code == 0, err
    assert "2 shard(s) written" in out and (tmp_path / "train-shards.json").is_file()
    code, out, err = run_main(["synth", "toy-videos", "--out", str(tmp_path), "--num-samples", "3",
                               "--samples-per-shard", "2", "--no-context", "--no-progress"], capsys)
    assert code == 0 and "0 shard(s) written, 2 kept" in out
    code, _, err = run_main(["synth", "teacher", "--config", "wan2.1-1.3b", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--checkpoint: required" in err
    code, _, err = run_main(["synth", "toy-videos", "--out", str(tmp_path), "--num-samples", "3",
                             "--samples-per-shard", "0"], capsys)
    assert code == 2 and "--samples-per-shard" in err
    code, _, err = run_main(["synth", "teacher", "--out", str(tmp_path), "--prompts-file", str(tmp_path / "nope.txt")],
                            capsys)
    assert code == 2 and "prompts_file" in err and "nope.txt" in err


# ----------------------------------------------------------------------------- training on latent shards


def fm_recipe(tmp_path, shards, **data):
    return recipe_from_dict({
        "method": {"name": "flow_matching"},
        "model": {"preset": "toy", "overrides": dict(TINY)},
        "data": {"source": "latent_shards", "train_shards": str(shards), "batch_size": 2, "num_workers": 0,
                 "shuffle_buffer": 4, **data},
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": 2, "log_every_n_steps": 1,
                    "val_every_n_steps": 1, "val_batches": 1},
        "optim": {"lr": 1e-3},
        "logging": {"run_dir": str(tmp_path / "run"), "wandb": False, "progress_bar": False},
        "checkpoint": {"every_n_steps": 0, "resume": None},
    })


@pytest.mark.parametrize("context", [True, False], ids=["context", "caption"])
def test_flow_matching_recipe_trains_on_latent_shards(tmp_path, context):
    from turbo_train.methods.flow_matching import FlowMatchingModule

    synth(tiny_pipe(), tmp_path / "shards", num_samples=4, store_context=context)
    val = {"val_shards": str(tmp_path / "shards")} if context else {}  # no val shards: validation is skipped
    recipe = fm_recipe(tmp_path, tmp_path / "shards", **val)
    runner.check_supported(recipe)
    text = FakeText()
    module = FlowMatchingModule(recipe, text_encoder=text, export_dir=tmp_path / "run")
    trainer, module = runner.fit(recipe, tmp_path / "run", module=module)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert ("val/loss" in trainer.callback_metrics) == context
    assert (tmp_path / "run" / "ema.safetensors").is_file()
    calls_for_uncond = 1  # the empty prompt for caption dropout
    assert (text.calls > calls_for_uncond) == (not context)  # captions encoded only without stored context


def test_rcm_recipe_trains_on_latent_shards(tmp_path):
    from safetensors.torch import save_file

    from turbo_train.methods.rcm import RCMModule

    small = dict(TINY, text_dim=16, in_channels=4, out_channels=4, freq_dim=32)

    def make(indices):  # generic writer, arbitrary latents: (4, 2, 4, 4) latents, (5, 16) states
        g = torch.Generator().manual_seed(indices.start)
        return [{"latent": 0.5 * torch.randn(4, 2, 4, 4, generator=g), "context": torch.randn(5, 16, generator=g),
                 "caption": f"prompt {i}", "meta": {}} for i in indices]

    write_latent_shards(tmp_path / "shards", 4, 2, make, settings={"source": "test"}, latent_shape=(4, 2, 4, 4),
                        progress=False)
    save_file({"embedding": torch.zeros(1, 5, 16)}, str(tmp_path / "uncond.safetensors"))
    (tmp_path / "teacher.safetensors").write_bytes(b"")  # the teacher is passed in; the path must exist
    recipe = recipe_from_dict({
        "method": {"name": "rcm", "rcm": {"tangent_warmup": 1, "student_update_freq": 2, "fake_score_lr": 1e-3,
                                          "uncond_path": str(tmp_path / "uncond.safetensors")}},
        "model": {"preset": "toy", "overrides": small, "checkpoint": str(tmp_path / "teacher.safetensors")},
        "data": {"source": "latent_shards", "train_shards": str(tmp_path / "shards"), "batch_size": 2,
                 "num_workers": 0, "shuffle_buffer": 0},
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": 2, "log_every_n_steps": 1},
        "optim": {"lr": 1e-3, "betas": [0.0, 0.999]},
        "ema": {"kind": "power", "sigma_rel": 0.1},
        "logging": {"run_dir": str(tmp_path / "run"), "wandb": False, "progress_bar": False},
        "checkpoint": {"every_n_steps": 0, "resume": None},
    })
    torch.manual_seed(0)
    teacher = WanModel(get_config("toy", **small))
    with torch.no_grad():
        teacher.head.head.weight.normal_(std=0.05)
    module = RCMModule(recipe, teacher=teacher, text_encoder=None, export_dir=tmp_path / "run")
    trainer, module = runner.fit(recipe, tmp_path / "run", module=module)
    assert int(module.iteration) == 2 and int(module.nan_samples) == 0
    assert all(np.isfinite(v) for v in module.last_logs.values()), module.last_logs
