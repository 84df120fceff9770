"""CPU parity of multi-process training: the loss sequence of 2 gloo processes vs 1 process at the
same global batch, through the real `turbo-train` CLI (MiniLM text encoder, toy videos on the fly).

    python tools/cpu_ddp_parity.py [--steps 8] [--keep DIR]

1 process runs 2 accumulated micro-batches of B videos per step; 2 processes (torchrun, DDP, and
then FSDP2) run 1 micro-batch each. Every micro-batch slot gets the same videos and noise in both
(turbo_train.callbacks.DeterministicSteps), so the sequences differ only by fp32 reduction order.
Compared: train/loss_global (the loss of the whole global batch, all ranks) at every step.
Writes benchmarks/cluster.json (device "cpu") through tools/bench_harness.py with
cpu_2proc_ddp_loss_max_rel_diff (the issue's figure) and cpu_2proc_fsdp2_loss_max_rel_diff.
The GPU figures of the cluster issue are not measured here.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import Harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe(steps: int) -> dict:
    return {
        "method": {"name": "flow_matching", "flow_matching": {"caption_dropout": 0.25}},
        "model": {"preset": "toy", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2}},
        "data": {"source": "toy_onthefly", "batch_size": 2, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": steps, "log_every_n_steps": 1,
                    "val_every_n_steps": 0, "seed": 3},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "logging": {"wandb": False, "progress_bar": False},
        "checkpoint": {"every_n_steps": 0, "resume": None},
    }


def train(recipe_path: Path, run_dir: Path, nproc: int, *overrides: str) -> dict[int, float]:
    """Run turbo-train; return {step: train/loss_global}."""
    args = ["-m", "turbo_train.cli", str(recipe_path), "--set", f"logging.run_dir={run_dir}",
            "--set", f"trainer.devices={nproc}"]
    for o in overrides:
        args += ["--set", o]
    cmd = [sys.executable] + args if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"turbo-train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    losses = {}
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss_global"):
                    losses[int(row["step"])] = float(row["train/loss_global"])
    return losses


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    if a.keys() != b.keys() or not a:
        raise SystemExit(f"the runs logged different steps: {sorted(a)} vs {sorted(b)}")
    return max(abs(a[k] - b[k]) / abs(a[k]) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    p.add_argument("--keep", metavar="DIR", help="run directories here (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = work / "parity.yaml"
        path.write_text(yaml.safe_dump(recipe(args.steps)))
        one = train(path, work / "one", 1, "trainer.accumulate_grad_batches=2")
        ddp = train(path, work / "ddp", 2, "trainer.strategy=ddp")
        fsdp = train(path, work / "fsdp2", 2, "trainer.strategy=fsdp2")
    print(f"{'step':>4} {'1 process':>12} {'2 x DDP':>12} {'2 x FSDP2':>12}")
    for k in sorted(one):
        print(f"{k:>4} {one[k]:12.8f} {ddp[k]:12.8f} {fsdp[k]:12.8f}")
    h = Harness("cluster")
    h.figure("cpu_2proc_ddp_loss_max_rel_diff", max_rel_diff(one, ddp))
    h.figure("cpu_2proc_fsdp2_loss_max_rel_diff", max_rel_diff(one, fsdp))
    h.figure("cpu_parity_steps", len(one))
    h.print_table()
    h.write()


if __name__ == "__main__":
    main()
