"""turbo-train across processes on the CPU (gloo): 2-process DDP and FSDP2 (and FSDP2 with Ulysses
sequence parallel) runs of a tiny toy recipe give the loss sequence of 1 process at the same global
batch; strategy and recipe errors; the parallel.py plan and the FLOP formula.

Same global batch: 2 processes x 1 micro-batch of B vs 1 process x 2 accumulated micro-batches of B.
Every micro-batch slot (data-parallel rank x micro-batch) gets the same videos and the same noise in
both runs (callbacks.DeterministicSteps, runner.ToyBatchStream), so the only difference is the order of
fp32 additions: DDP all-reduces g0 + g1 then divides by 2, accumulation adds g0/2 + g1/2; FSDP2
reduce-scatters shards. Each such sum differs by at most ~1 ulp (6e-8 relative); AdamW's update
(lr·m/(sqrt(v)+eps), ~1e-3 of a weight) passes a relative gradient change through almost unchanged,
so after a handful of steps the losses agree to ~1e-6 relative. The tolerance, 1e-4 (the issue's
target), leaves room for that growth and would still catch any real mismatch: a different sample or
noise in one slot changes the loss by ~10 % at this size.

The helpers here (a worker script with a fake text encoder, torchrun launching, CSV reading) are
shared by test_resume.py and test_preemption.py.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]

# a tiny DiT on small toy videos: one 2-process run takes ~15-25 s on 2 shared cores
TINY_RECIPE = {
    "method": {"name": "flow_matching", "flow_matching": {"caption_dropout": 0.25}},
    "model": {"preset": "toy", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2}},
    "data": {"source": "toy_onthefly", "batch_size": 2, "num_workers": 0},
    "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 4,
                "log_every_n_steps": 1, "val_every_n_steps": 0, "seed": 3},
    "optim": {"lr": 1e-3, "warmup_steps": 1},
    "ema": {"kind": "power"},
    "logging": {"wandb": False, "progress_bar": False},
    "checkpoint": {"every_n_steps": 2, "keep": 1, "resume": "auto"},
}

# the worker: turbo-train's CLI with a fake text encoder (no MiniLM load), one thread, an optional NaN
# injection (env TURBO_TEST_NAN_STEPS="2,3": the loss of those optimizer steps becomes NaN) and an
# optional progress file (env TURBO_TEST_PROGRESS=path: "<rank> <pid> <step>" per training step, then
# TURBO_TEST_STEP_SLEEP seconds of sleep, so that a test can signal a process mid-run)
WORKER = textwrap.dedent('''
    import os, sys, zlib
    import torch
    torch.set_num_threads(1)
    import turbo_train.methods.flow_matching as fm
    import turbo_train.methods.batching as batching

    class FakeTextEncoder:
        def encode(self, prompts):
            out = []
            for p in prompts:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                out.append(torch.randn(8, 384, generator=g) if p else torch.zeros(8, 384))
            return torch.stack(out)

        def empty_embedding(self):
            return self.encode([""])

    batching.build_text_encoder = lambda cfg, device: FakeTextEncoder()
    nan_steps = {int(s) for s in os.environ.get("TURBO_TEST_NAN_STEPS", "").split(",") if s}
    if nan_steps:
        step = fm.FlowMatchingModule.training_step

        def training_step(self, batch, batch_idx):
            loss = step(self, batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step in nan_steps else loss

        fm.FlowMatchingModule.training_step = training_step
    progress = os.environ.get("TURBO_TEST_PROGRESS")
    if progress:
        import time
        step_fn = fm.FlowMatchingModule.training_step

        def training_step(self, batch, batch_idx):
            with open(progress, "a") as f:
                f.write(f"{self.global_rank} {os.getpid()} {self.trainer.global_step}\\n")
            time.sleep(float(os.environ.get("TURBO_TEST_STEP_SLEEP", "0")))
            return step_fn(self, batch, batch_idx)

        fm.FlowMatchingModule.training_step = training_step
    from turbo_train import cli
    sys.exit(cli.main(sys.argv[1:]))
''')


def write_recipe(tmp_path: Path, name: str = "recipe.yaml", **sections) -> Path:
    """TINY_RECIPE with sections updated key by key (e.g. trainer={"max_steps": 6}), written as YAML."""
    data = json.loads(json.dumps(TINY_RECIPE))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def worker_script(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def worker_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_command(tmp_path: Path, recipe: Path, run_dir: Path, nproc: int = 1, overrides=()) -> list[str]:
    """turbo-train as plain python (1 process) or under torchrun (nproc processes on this host, gloo)."""
    args = [str(worker_script(tmp_path)), str(recipe), "--set", f"logging.run_dir={run_dir}",
            "--set", f"trainer.devices={nproc}"]
    for o in overrides:
        args += ["--set", o]
    if nproc == 1:
        return [sys.executable] + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + args


def run_train(tmp_path: Path, recipe: Path, run_dir: Path, nproc: int = 1, overrides=(), env=None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(tmp_path, recipe, run_dir, nproc, overrides), cwd=tmp_path,
                          env=env or worker_env(), capture_output=True, text=True, timeout=timeout)


def read_metric(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of a logged metric over every CSV version of a run (a resumed run adds a version)."""
    out = {}
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)


def assert_ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


# ----------------------------------------------------------------------------- parallel.py on 2 processes

CFG = dict(dim=48, ffn_dim=64, num_heads=4, num_layers=2, text_dim=16, in_channels=4, out_channels=4, freq_dim=32)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_inputs():
    from turbo_infer.models.wan import WanConfig, WanModel

    torch.manual_seed(0)
    m = WanModel(WanConfig(**CFG))
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 6, 6, generator=g)  # 27 tokens: odd, the Ulysses shard pads
    return m, x, torch.tensor([700.0, 20.0]), torch.randn(2, 5, 16, generator=g)


def _parallel_worker(rank, world, port, out_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from turbo_train import ema as ema_lib
    from turbo_train.parallel import gather_full, is_sharded, parallelize_wan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m, x, t, ctx = _tiny_inputs()
    ema = _tiny_inputs()[0].requires_grad_(False)
    mesh = init_device_mesh("cpu", (world,))
    # the whole job is one Ulysses group (dp = 1) and FSDP shards over it: grads are averaged over 2
    # ranks, the gather's x2 gradient scaling must turn that into the sum of the token shares
    parallelize_wan(m, sp_group=dist.group.WORLD, activation_checkpointing=True, checkpoint_policy="keep_attention",
                    fsdp_mesh=mesh)
    parallelize_wan(ema, sp_group=dist.group.WORLD, fsdp_mesh=mesh)
    assert is_sharded(m) and is_sharded(ema) and m.gradient_checkpointing and m.checkpoint_policy == "keep_attention"
    out = m(x, t, ctx)
    out.square().mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
    ema_lib.update_ema(ema, m, 0.25)  # on DTensor shards: ema = 0.25 ema + 0.75 model
    full_ema = gather_full(ema)
    full_model = gather_full(m)
    if rank == 0:
        torch.save({"out": out.detach(), "grads": grads, "ema": full_ema.state_dict(),
                    "model": full_model.state_dict()}, out_path)
    # leave together, as turbo-train does: a rank that tears gloo down while its peer is still
    # saving can abort (seen once under a loaded CI: SIGABRT, "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    # and skip the interpreter's teardown: the same abort came back once more (session 31, a clean-clone CI run,
    # rank 1 after the barrier) from a C++ thread still joinable when the worker process exits. Everything this
    # worker checks has run above (a failure raises before here); exit code 0 is what mp.spawn waits for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_parallelize_wan_sequence_parallel_fsdp_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    m, x, t, ctx = _tiny_inputs()
    ema = _tiny_inputs()[0]
    ref = m(x, t, ctx)
    ref.square().mean().backward()
    mp.spawn(_parallel_worker, args=(2, _free_port(), str(tmp_path / "out.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt")
    # fp32; only the order of additions differs (token shards summed across ranks): ~1e-7 relative
    torch.testing.assert_close(got["out"], ref.detach(), rtol=1e-5, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-7, msg=lambda s: f"{n}: {s}")
    for n, p in m.state_dict().items():  # gather_full returns the full, unsharded weights
        torch.testing.assert_close(got["model"][n], p, rtol=0, atol=0)
        torch.testing.assert_close(got["ema"][n], 0.25 * ema.state_dict()[n] + 0.75 * p, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- 2 processes vs 1, end to end


@pytest.fixture(scope="module")
def reference_one_process(tmp_path_factory):
    """1 process x 2 accumulated micro-batches of 2 videos, 4 steps: the global batch of 2 x 1 x 2."""
    tmp = tmp_path_factory.mktemp("one")
    recipe = write_recipe(tmp)
    assert_ok(run_train(tmp, recipe, tmp / "run", 1, ["trainer.accumulate_grad_batches=2"]))
    return tmp / "run"


def test_ddp_two_processes_match_one(tmp_path, reference_one_process):
    recipe = write_recipe(tmp_path)
    proc = run_train(tmp_path, recipe, tmp_path / "run", 2, ["trainer.strategy=ddp"])
    assert_ok(proc)
    one = read_metric(reference_one_process, "train/loss_global")
    two = read_metric(tmp_path / "run", "train/loss_global")
    assert len(one) == 4
    # justified in the module docstring: fp32 reduction order only (measured here: 0.0, the two-term sums
    # (a + b)/2 and a/2 + b/2 round alike)
    assert max_rel_diff(one, two) <= 1e-4
    assert two != read_metric(tmp_path / "run", "train/loss")  # rank 0's own micro-batch differs from the global loss


def test_fsdp2_two_processes_match_one(tmp_path, reference_one_process):
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path)
    assert_ok(run_train(tmp_path, recipe, tmp_path / "run", 2, ["trainer.strategy=fsdp2"]))
    one = read_metric(reference_one_process, "train/loss_global")
    assert max_rel_diff(one, read_metric(tmp_path / "run", "train/loss_global")) <= 1e-4
    # sharded: each rank wrote its shard of the checkpoint; the EMA export gathered the full weights
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert {p.name for p in last.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", "meta.pt"}
    a, b = load_file(str(reference_one_process / "ema.safetensors")), load_file(str(tmp_path / "run" / "ema.safetensors"))
    for k in a:  # EMA after 4 steps; reduce-scatter vs local accumulation: ~1e-7
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # two more runs (1 and 2 processes): ~45 s on 2 shared cores
def test_fsdp2_sequence_parallel_two_processes_match_one(tmp_path):
    recipe = write_recipe(tmp_path)
    assert_ok(run_train(tmp_path, recipe, tmp_path / "one", 1))
    assert_ok(run_train(tmp_path, recipe, tmp_path / "sp", 2, ["trainer.strategy=fsdp2", "trainer.sequence_parallel=2"]))
    one, sp = read_metric(tmp_path / "one", "train/loss_global"), read_metric(tmp_path / "sp", "train/loss_global")
    assert len(one) == 4 and max_rel_diff(one, sp) <= 1e-4


# ----------------------------------------------------------------------------- recipe and strategy checks


def recipe_with(**sections):
    from turbo_train.recipe import recipe_from_dict

    data = json.loads(json.dumps(TINY_RECIPE))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return recipe_from_dict(data, "tiny.yaml")


@pytest.mark.parametrize("sections, key, words", [
    ({"trainer": {"sequence_parallel": 2, "strategy": "ddp"}}, "trainer.sequence_parallel", "needs trainer.strategy fsdp2"),
    ({"trainer": {"sequence_parallel": 3, "strategy": "fsdp2", "devices": 3}}, "trainer.sequence_parallel",
     "does not divide the model's 2 attention heads"),
    ({"trainer": {"sequence_parallel": 2, "strategy": "fsdp2", "devices": 3}}, "trainer.sequence_parallel",
     "does not divide the 3 processes"),
    ({"trainer": {"strategy": "fsdp2", "precision": "16-mixed"}}, "trainer.precision", "not supported with fsdp2"),
    ({"trainer": {"strategy": "fsdp2"}, "ema": {"extra_sigma_rels": [0.2]}}, "ema.extra_sigma_rels", "not sharded"),
    ({"trainer": {"strategy": "deepspeed_zero2"}, "ema": {"kind": "none"}}, "trainer.strategy", "CUDA GPUs only"),
    ({"trainer": {"strategy": "deepspeed_zero3"}}, "ema.kind", "ZeRO-3 partitions the EMA copy"),
    ({"trainer": {"strategy": "deepspeed_zero2", "precision": "bf16-mixed"}}, "ema.kind", "round away"),
    ({"trainer": {"strategy": "deepspeed_zero3"}, "ema": {"kind": "none"},
      "method": {"name": "rcm", "rcm": {"loss_mode": "rcm"}}}, "trainer.strategy", "second DeepSpeed engine"),
    # ZeRO-2 takes rCM with a fake score (a second engine): on the CPU only the hardware check is left
    ({"trainer": {"strategy": "deepspeed_zero2"}, "ema": {"kind": "none"},
      "method": {"name": "rcm", "rcm": {"loss_mode": "rcm"}}}, "trainer.strategy", "CUDA GPUs only"),
])
def test_strategy_errors_name_the_key(sections, key, words):
    from turbo_train.runner import check_strategy

    with pytest.raises(ValueError) as e:
        check_strategy(recipe_with(**sections))
    assert str(e.value).startswith(key + ":") and words in str(e.value), str(e.value)


def test_recipe_rejects_bad_cluster_values():
    from turbo_train.recipe import recipe_from_dict

    for sections, key in [({"trainer": {"sequence_parallel": 0}}, "trainer.sequence_parallel"),
                          ({"trainer": {"max_nonfinite_steps": -1}}, "trainer.max_nonfinite_steps"),
                          ({"model": {"compile": "yes"}}, "model.compile"),
                          ({"trainer": {"strategy": "fsdp"}}, "trainer.strategy")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            recipe_from_dict({**sections}, "bad.yaml")


def test_build_strategy(monkeypatch):
    from turbo_train import runner
    from turbo_train.lightning_compat import pl
    from turbo_train.parallel import FSDP2Strategy

    assert runner.build_strategy(recipe_with()) == "auto"
    ddp = runner.build_strategy(recipe_with(trainer={"devices": 2}))  # auto with 2 devices -> our DDP settings
    assert isinstance(ddp, pl.strategies.DDPStrategy)
    fsdp = runner.build_strategy(recipe_with(trainer={"strategy": "fsdp2", "devices": 2, "sequence_parallel": 2}))
    assert isinstance(fsdp, FSDP2Strategy) and fsdp.sequence_parallel == 2
    # DeepSpeed on a GPU machine: the recipe validates and the strategy carries the ZeRO stage
    monkeypatch.setattr(runner, "uses_gpu", lambda recipe: True)
    for stage in (2, 3):
        r = recipe_with(trainer={"strategy": f"deepspeed_zero{stage}", "precision": "bf16-mixed"}, ema={"kind": "none"})
        runner.check_strategy(r)
        ds = runner.build_strategy(r)
        assert isinstance(ds, pl.strategies.DeepSpeedStrategy) and ds.config["zero_optimization"]["stage"] == stage


# ----------------------------------------------------------------------------- model FLOPs


def test_wan_forward_flops_matches_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from turbo_infer.models.wan import WanConfig, WanModel
    from turbo_train.callbacks import wan_forward_flops, wan_train_flops

    cfg = WanConfig(**CFG)
    m = WanModel(cfg)
    x = torch.randn(1, 4, 3, 6, 6)  # 27 video tokens
    ctx = torch.randn(1, 5, 16)
    # the math attention backend runs QKᵀ and PV as bmm, which the counter sees (fused kernels it skips)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(x, torch.tensor([500.0]), ctx)
    counted = counter.get_total_flops()
    ours = wan_forward_flops(cfg, 27, 5)
    # torch counts every matmul, conv and attention; ours leaves out the per-sample time embedding MLP
    # (O(d²) per sample, not per token) and element-wise ops, which FlopCounter ignores too
    time_mlp = 2 * (cfg.freq_dim * cfg.dim + cfg.dim * cfg.dim + cfg.dim * 6 * cfg.dim)
    assert ours + time_mlp == pytest.approx(counted, rel=1e-9)
    assert wan_train_flops(cfg, 27, 5) == 3 * ours


# ----------------------------------------------------------------------------- launch templates

LAUNCH = ROOT / "recipes" / "launch"


def test_launch_templates_parse():
    for name in ("torchrun.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)


def test_torchrun_template_starts_the_processes(tmp_path):
    # --dry-run: both ranks validate the recipe with the devices/nodes the template sets; rank 0 prints it
    recipe = write_recipe(tmp_path)
    env = worker_env(NPROC=2)
    proc = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), str(recipe), "--set", f"logging.run_dir={tmp_path}/run",
                           "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert_ok(proc)
    assert proc.stdout.count("# resolved recipe:") == 1
    resolved = yaml.safe_load(proc.stdout.split("\n", 1)[1])
    assert resolved["trainer"]["devices"] == 2 and resolved["trainer"]["num_nodes"] == 1


@pytest.mark.parametrize("code, requeued", [(143, True), (0, False), (1, False)])
def test_slurm_template_passes_the_allocation_and_requeues_on_143(tmp_path, code, requeued):
    # stand-ins for srun (records its arguments, exits with `code`) and scontrol (records its arguments)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/srun.args\nexit {code}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol.args\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS_PER_NODE="4",
               SLURM_JOB_NUM_NODES="2")
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "r.yaml", "--set", "optim.lr=1e-4"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code
    args = (tmp_path / "srun.args").read_text().split()
    assert args[:3] == ["python", "-m", "turbo_train.cli"] and args[3] == "r.yaml"
    joined = " ".join(args)
    for s in ("trainer.devices=4", "trainer.num_nodes=2", "checkpoint.resume=auto", "optim.lr=1e-4"):
        assert f"--set {s}" in joined
    assert (tmp_path / "scontrol.args").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


# ----------------------------------------------------------------------------- turbo-infer --num-gpus


def test_turbo_infer_num_gpus_errors(tmp_path, capsys):
    from turbo_infer import cli

    def err(*args):
        with pytest.raises(SystemExit) as e:
            cli.main(["--prompt", "a red circle", "--out", str(tmp_path / "v.mp4"), "--no-progress", *args])
        assert e.value.code == 2
        return capsys.readouterr().err

    e = err("--num-gpus", "3")  # the shipped toy teacher has 4 heads
    assert "--num-gpus" in e and "4 attention heads" in e and "[1, 2, 4]" in e
    assert "--num-gpus: must be an int >= 1" in err("--num-gpus", "0")


def test_turbo_infer_num_gpus_hands_the_run_to_the_workers(tmp_path, monkeypatch):
    from turbo_infer import cli, multigpu

    calls = []
    monkeypatch.setattr(multigpu, "generate_videos", lambda *a, **k: calls.append((a, k)))
    out = tmp_path / "v.mp4"
    assert cli.main(["--prompt", "a red circle", "--prompt", "a blue square", "--out", str(out), "--num-gpus", "4",
                     "--steps", "2", "--seed", "7", "--device", "cpu", "--no-progress"]) == 0
    (spec, prompts, outs, gen, n), kw = calls[0]
    assert spec["kind"] == "toy" and spec["dtype"] == "float32" and n == 4 and kw["device"] == "cpu"
    assert prompts == ["a red circle", "a blue square"] and [p.name for p in outs] == ["v_000.mp4", "v_001.mp4"]
    assert gen["steps"] == 2 and gen["seed"] == 7 and gen["num_frames"] == 8


def test_multigpu_two_processes_write_the_video_of_one(tmp_path):
    # the shipped toy teacher (4 heads: 2 per rank); 2 gloo processes split each forward's tokens (Ulysses)
    from turbo_infer.multigpu import generate_videos

    spec = {"kind": "toy", "checkpoint": None, "text_encoder": None, "dtype": "float32", "model_overrides": {}}
    gen = dict(steps=2, guidance=3.0, seed=5, num_frames=8, height=64, width=64, sampler="euler", shift=None,
               progress=False)
    prompts = ["a red circle moving left"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_videos(spec, prompts, [tmp_path / "one.mp4"], gen, 1)
    finally:
        torch.set_num_threads(n)
    generate_videos(spec, prompts, [tmp_path / "two.mp4"], gen, 2)
    # fp32 on the CPU: the token shards change no sum here (measured: identical bytes); allow at most 1
    # level of 255 on a decoded pixel, should a BLAS pick another blocking for the shorter shards
    from turbo_infer.video_io import read_video

    a, b = read_video(tmp_path / "one.mp4"), read_video(tmp_path / "two.mp4")
    assert a.shape == b.shape == (8, 64, 64, 3)
    assert abs(a.astype(int) - b.astype(int)).max() <= 1


# ----------------------------------------------------------------------------- monitoring


def test_throughput_flops_and_memory_are_logged(tmp_path, monkeypatch):
    import turbo_train.methods.batching as batching
    from turbo_train import cli
    from turbo_train.callbacks import wan_train_flops
    from turbo_train.recipe import recipe_from_dict

    from fakes import FakeTextEncoder

    monkeypatch.setattr(batching, "build_text_encoder", lambda cfg, device: FakeTextEncoder())
    recipe = write_recipe(tmp_path, trainer={"max_steps": 3})
    assert cli.main([str(recipe), "--set", f"logging.run_dir={tmp_path / 'run'}"]) == 0
    m = {k: read_metric(tmp_path / "run", k) for k in ("train/samples_per_s", "train/step_s",
                                                        "train/model_tflops_per_s", "train/peak_rss_gib")}
    for k, v in m.items():
        assert len(v) == 3 and all(x > 0 for x in v.values()), k
    # window of 1 step: TFLOP/s x step time = the model FLOPs of one step = 2 videos of 8x64x64 -> toy
    # latents (48, 8, 16, 16) -> 8·8·8 = 512 tokens, 8 text tokens, forward + backward
    cfg = recipe_from_dict(yaml.safe_load(recipe.read_text())).model.wan_config()
    for step in m["train/step_s"]:
        flops = m["train/model_tflops_per_s"][step] * 1e12 * m["train/step_s"][step]
        assert flops == pytest.approx(2 * wan_train_flops(cfg, 512, 8), rel=1e-5)


def test_data_skip_monitor_surfaces_the_shard_counters():
    from types import SimpleNamespace

    from turbo_train.callbacks import DataSkipMonitor

    logged = {}
    module = SimpleNamespace(log=lambda k, v, **kw: logged.__setitem__(k, v))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(skipped_shards=2, skipped_samples=5))
    DataSkipMonitor().on_train_batch_end(trainer, module, None, None, 0)
    assert logged == {"data/skipped_shards": 2.0, "data/skipped_samples": 5.0}
    logged.clear()
    DataSkipMonitor().on_train_batch_end(SimpleNamespace(datamodule=None), module, None, None, 0)
    assert logged == {}  # on-the-fly data: nothing to count


def test_gpu_peak_table():
    from turbo_train.callbacks import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "32-true", "high") == 378.0
    assert gpu_peak_tflops("NVIDIA H200", "bf16-mixed") == 989.4
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "32-true", "highest") == 19.5
    assert gpu_peak_tflops("NVIDIA GeForce RTX 4090", "bf16-mixed") is None  # unknown: no MFU, TFLOP/s only


def test_throughput_logs_only_at_window_ends():
    """Between window ends the monitor logs nothing (on a GPU a logged float is a host->device copy that
    waits for the queued kernels); at each end it logs the window's averages once."""
    from types import SimpleNamespace

    from turbo_train.callbacks import ThroughputMonitor

    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda k, v, **kw: logged.append((step["n"], k)))
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace())
    step = {"n": 0}
    mon = ThroughputMonitor(window=2)
    mon._t0, mon._step0 = 0.0, 0  # what on_train_start sets (without its hooks on the networks)
    for n in range(1, 6):
        step["n"] = trainer.global_step = n
        mon.on_train_batch_end(trainer, module, None, {"video": torch.zeros(3, 1)}, n - 1)
    assert sorted({s for s, _ in logged}) == [2, 4]
    assert {k for s, k in logged if s == 2} == {"train/samples_per_s", "train/step_s", "train/model_tflops_per_s",
                                               "train/peak_rss_gib"}
    assert mon.samples_per_s > 0 and mon.step_s > 0
