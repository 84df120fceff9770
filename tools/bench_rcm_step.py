"""The Wan-1.3B-shape rCM distillation step on one GPU, run through the project's own recipe and
launch path (recipes/wan2.1-1.3b/rcm.yaml -> turbo_train.cli -> runner.fit -> Lightning).

    python tools/bench_rcm_step.py [--steps 8] [--skip 3] [--runs fsdp2,zero2] [--merge-into-cluster]
    python tools/bench_rcm_step.py --tiny          # the same code path on the CPU, tiny model, no JSON kept

What it does:
 1. writes random inputs at the 1.3B shape (480p, 81 frames): a latent shard of a few samples
    (latent (16, 21, 60, 104) = 32760 tokens, text states (512, 4096)) with the project's shard
    writer (turbo_train.synth.write_latent_shards), the negative-prompt states file that
    method.rcm.uncond_path wants, and a random-init teacher checkpoint in bf16
    (save_wan_checkpoint): rCM refuses to run without model.checkpoint, and the weights do not
    matter for timing;
 2. runs turbo-train on the recipe once per strategy, each in its own process (a clean GPU, and an
    out-of-memory run is reported instead of ending the tool), with --set overrides: the inputs
    above, trainer.devices=1, trainer.max_steps=--steps, metrics every step, no wandb, no progress
    bar, no checkpoint writing (the child replaces the runner's checkpoint callback by one that
    never writes: a 1.3B rCM checkpoint is ~40 GB of student, fake score, EMA and Adam state) and
    no EMA export. Runs:
      fsdp2   trainer.strategy fsdp2 (FSDP2 on one rank, activation checkpointing, bf16-mixed),
              full rCM (sCM + DMD with the fake score), EMA on; method.rcm.tangent_warmup=2 so that
              the measured steps hold the recipe's post-warmup schedule (one student step with
              sCM + DMD per student_update_freq = 5 iterations, fake-score steps in between)
              instead of the first 1000 sCM-only iterations; steps 1-3 warm up the sCM step
              without JVP (r = 0), with JVP, and the fake-score step
      zero2   trainer.strategy deepspeed_zero2 on one rank: full rCM, the student in the strategy's
              engine and the fake score in a second engine (turbo_train/deepspeed_engines.py), the
              fsdp2 run's schedule (tangent_warmup=2), but ema.kind=none: under bf16-mixed DeepSpeed
              casts the whole module, an EMA copy included, to bf16 (the runner refuses it)
      fsdp2_fullac (optional) fsdp2 with activation_checkpointing_policy full (every block's forward
              recomputed in backward) instead of the recipe's keep_attention: the same-device comparison
      fsdp2_noema  (optional) fsdp2 with the zero2 run's settings (no EMA): the like-for-like comparison
      zero2_scm, fsdp2_scm  (optional) sCM only (loss_mode scm: every iteration a student step), no EMA
 3. reads the CSV log (run_dir/csv/version_0/metrics.csv: ThroughputMonitor's train/step_s,
    train/mfu, train/peak_mem_gib at every step), prints a table and writes
    benchmarks/rcm_step.json (and $OUT/rcm_step.json) via tools/bench_harness.py; with
    --merge-into-cluster also merges the cluster figures into benchmarks/cluster.json, keeping the
    figures already there.

Figures (measured steps = the steps after the first --skip):
  rcm_1.3b_step_s          fsdp2 run: the mean iteration time of the post-warmup schedule,
                           (t_student + (f - 1)·t_fake) / f with f = student_update_freq and t_* the
                           median time of the measured student / fake-score steps
  rcm_1.3b_step_mfu        the same cycle's MFU: model FLOPs / (time · peak) with ThroughputMonitor's
                           count (turbo_train/callbacks.py): every WanModel forward in a training step
                           at 2·N·tokens + the attention term (4·layers·dim·(T² + T·Lc)), x3 when
                           gradients flow into the network (forward + backward), x1 for no-grad calls
                           (teacher CFG pair, rollouts, fake-score denoising, the JVP's primal pass);
                           NOT counted: the tangent half of the JVP, activation-checkpoint recompute,
                           norms/RoPE/modulation. A lower bound of the hardware utilisation.
                           Peak = dense bf16 989.4 TFLOP/s (H100 SXM).
  rcm_1.3b_peak_mem_gib    fsdp2 run: torch.cuda.max_memory_allocated over the whole run, GiB
  rcm_1.3b_student_step_s, rcm_1.3b_fake_step_s (+ _mfu): the two kinds of fsdp2 step
  rcm_1.3b_fsdp2_1gpu_step_s, rcm_1.3b_fsdp2_1gpu_peak_mem_gib: the same as rcm_1.3b_step_s /
                           rcm_1.3b_peak_mem_gib (cluster issue's names)
  rcm_1.3b_zero2_1gpu_step_s   zero2 run: the same schedule cycle as the fsdp2 run's (no EMA update)
  rcm_1.3b_zero2_1gpu_peak_mem_gib, rcm_1.3b_zero2_1gpu_step_mfu
  rcm_1.3b_<run>_1gpu_step_s, ..._peak_mem_gib, ..._step_mfu   for the optional runs
A run that fails leaves its figures out; the tool prints why (out of memory is named as such) and
exits 1 after writing the figures it has.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
RECIPE = ROOT / "recipes" / "wan2.1-1.3b" / "rcm.yaml"
TOOL = "rcm_step"
CLUSTER_FIGURES = ("rcm_1.3b_fsdp2_1gpu_step_s", "rcm_1.3b_zero2_1gpu_step_s", "rcm_1.3b_fsdp2_1gpu_peak_mem_gib",
                   "rcm_1.3b_zero2_1gpu_peak_mem_gib")

# shapes: (latent (C, F, H, W), text states (L, D), tokens of the prompt that are non-zero)
FULL = {"latent": (16, 21, 60, 104), "context": (512, 4096), "prompt_tokens": 96, "overrides": {}}
TINY = {"latent": (16, 3, 8, 8), "context": (16, 32), "prompt_tokens": 6,
        "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 32, "freq_dim": 32}}

# per run: what it is, and its --set overrides on top of the common ones
RUNS = {
    "fsdp2": ("FSDP2, 1 rank, full rCM (sCM + DMD + fake score), EMA on",
              ["trainer.strategy=fsdp2", "method.rcm.tangent_warmup=2"]),
    "zero2": ("DeepSpeed ZeRO-2, 1 rank, full rCM (fake score in a second engine), no EMA (DeepSpeed casts it to bf16)",
              ["trainer.strategy=deepspeed_zero2", "method.rcm.tangent_warmup=2", "ema.kind=none"]),
    "fsdp2_fullac": ("FSDP2, 1 rank, full rCM, EMA on, every block recomputed in backward "
                     "(activation_checkpointing_policy full): the fsdp2 run's settings before keep_attention",
                     ["trainer.strategy=fsdp2", "method.rcm.tangent_warmup=2",
                      "model.activation_checkpointing_policy=full"]),
    "fsdp2_noema": ("FSDP2, 1 rank, full rCM, no EMA: the zero2 run's settings under fsdp2",
                    ["trainer.strategy=fsdp2", "method.rcm.tangent_warmup=2", "ema.kind=none"]),
    "zero2_scm": ("DeepSpeed ZeRO-2, 1 rank, sCM only (loss_mode scm), no EMA",
                  ["trainer.strategy=deepspeed_zero2", "method.rcm.loss_mode=scm", "ema.kind=none"]),
    "fsdp2_scm": ("FSDP2, 1 rank, sCM only, no EMA",
                  ["trainer.strategy=fsdp2", "method.rcm.loss_mode=scm", "ema.kind=none"]),
}
FIGURE_PREFIX = {name: f"rcm_1.3b_{name}_1gpu" for name in RUNS}
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
            "GROUP_RANK")
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")


def log(msg: str) -> None:
    print(f"[bench_rcm_step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. inputs


def write_inputs(work: Path, shape: dict, num_samples: int, seed: int = 0) -> dict:
    """Random latent shard(s), the uncond states file and a random teacher checkpoint under `work`.
    Returns {"shards": dir, "uncond": file, "checkpoint": file}."""
    import torch
    from safetensors.torch import save_file

    from turbo_infer.models.wan import WanModel, get_config
    from turbo_infer.models.wan_keys import save_wan_checkpoint
    from turbo_train.synth import write_latent_shards

    g = torch.Generator().manual_seed(seed)
    L, D = shape["context"]
    n = shape["prompt_tokens"]

    def states() -> torch.Tensor:
        """(L, D) text states: n random rows, zeros past the prompt's end (as umT5 states are stored)."""
        ctx = torch.zeros(L, D)
        ctx[:n] = 0.1 * torch.randn(n, D, generator=g)
        return ctx

    def make_samples(indices: range) -> list[dict]:
        return [{"latent": torch.randn(shape["latent"], generator=g), "context": states(),
                 "caption": f"random sample {i}", "meta": {"source": "random"}} for i in indices]

    shards = work / "shards"
    log(f"writing {num_samples} random latent samples {shape['latent']} + text states {shape['context']} to {shards}")
    write_latent_shards(shards, num_samples, num_samples, make_samples, latent_shape=tuple(shape["latent"]),
                        settings={"source": "random", "seed": seed, "prompt_tokens": n}, latent_dtype="float16",
                        progress=False, rank=0, world=1)
    uncond = work / "uncond.safetensors"
    save_file({"embedding": states().unsqueeze(0).contiguous()}, str(uncond))

    ckpt = work / "teacher.safetensors"
    if not ckpt.exists():
        cfg = get_config("wan2.1-1.3b", **shape["overrides"])
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        teacher = WanModel(cfg).to(torch.bfloat16)  # the model's own init; bf16 halves the file
        save_wan_checkpoint(teacher, ckpt)
        n_params = sum(p.numel() for p in teacher.parameters())
        del teacher
        log(f"wrote a random teacher ({n_params / 1e9:.3f}B parameters, bf16) to {ckpt} in "
            f"{time.perf_counter() - t0:.1f} s")
    return {"shards": shards, "uncond": uncond, "checkpoint": ckpt}


# ----------------------------------------------------------------------------- 2. the runs


def common_overrides(inputs: dict, run_dir: Path, steps: int, tiny: bool) -> list[str]:
    sets = [
        f"model.checkpoint={inputs['checkpoint']}",
        f"data.train_shards={inputs['shards']}",
        f"method.rcm.uncond_path={inputs['uncond']}",
        "data.num_workers=0",  # one shard sample per step: decoding ~8 MB in the main process is negligible
        "data.shuffle_buffer=4",
        "trainer.devices=1",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",  # ThroughputMonitor: one window per step
        "trainer.max_nonfinite_steps=0",  # random weights: never stop on a skipped step
        "logging.wandb=false",
        "logging.progress_bar=false",
        f"logging.run_dir={run_dir}",
        "checkpoint.every_n_steps=0",
        "checkpoint.resume=null",
        "checkpoint.export_ema=false",
    ]
    if tiny:
        sets += [
            "model.overrides=" + json.dumps(TINY["overrides"]),
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
        ]
    return sets


def run_overrides(name: str, tiny: bool) -> list[str]:
    sets = list(RUNS[name][1])
    if tiny and name.startswith("zero2"):
        # Lightning's DeepSpeedStrategy refuses the CPU: the tiny path keeps the run's method settings
        sets = [s for s in sets if not s.startswith("trainer.strategy=")] + ["trainer.strategy=auto"]
    return sets


def launch(name: str, recipe: Path, sets: list[str], run_dir: Path, timeout: float | None,
           expandable_segments: bool = False) -> dict:
    """Run turbo-train in a child process (this file with --child); returns {"ok", "why", "log", "seconds"}.
    expandable_segments: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the child (less
    fragmentation of the CUDA caching allocator near the memory limit)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(recipe)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in DIST_ENV:  # each run is its own one-process job, whatever launched this tool
        env.pop(k, None)
    if expandable_segments:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log(f"run {name}: {RUNS[name][0]}")
    print("$ turbo-train " + str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)
          + "".join(f" --set {s}" for s in sets), flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if rc == 0:
        log(f"run {name}: done in {seconds:.0f} s (log {log_path})")
        return {"ok": True, "why": "", "log": log_path, "seconds": seconds}
    if rc is None:
        why = f"timed out after {timeout:.0f} s"
    elif any(m in text for m in OOM_MARKERS):
        why = "out of GPU memory"
    else:
        why = f"exit code {rc}"
    log(f"run {name}: FAILED ({why}) after {seconds:.0f} s; last lines of {log_path}:")
    print("\n".join(text.splitlines()[-40:]), flush=True)
    return {"ok": False, "why": why, "log": log_path, "seconds": seconds}


def child_main(argv: list[str]) -> int:
    """turbo-train in this process, with the runner's checkpoint callback replaced by one that never
    writes (no step checkpoints, no last.ckpt): the benchmark measures steps, not checkpoint I/O."""
    from turbo_train import cli, runner

    class NoWriteCheckpoint(runner.StepCheckpoint):
        def __init__(self, **kwargs):
            kwargs.update(every_n_train_steps=None, save_top_k=0, save_last=False)
            super().__init__(**kwargs)

        def on_train_end(self, trainer, pl_module):  # StepCheckpoint saves here: skip
            pass

    runner.StepCheckpoint = NoWriteCheckpoint
    return cli.main(argv)


def keep_logs(run_dir: Path, dest: Path) -> None:
    """Copy a run's train.log, resolved recipe and metrics CSV to `dest` (the device tool's $OUT)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    csvs = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    for src in [run_dir / "train.log", run_dir / "resolved_recipe.yaml", *csvs]:
        if src.is_file():
            shutil.copy(src, dest / src.name)


# ----------------------------------------------------------------------------- 3. metrics


def read_steps(run_dir: Path) -> list[dict]:
    """One dict per logged step of run_dir/csv/version_*/metrics.csv (rows of a step merged), in step
    order: {"step", "step_s", "mfu", "peak_mem_gib", "kind" ("student" | "fake" | "?")}."""
    files = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no CSV log under {run_dir / 'csv'}")
    merged: dict[int, dict] = {}
    with open(files[-1]) as fh:
        for row in csv.DictReader(fh):
            if not row.get("step"):
                continue
            merged.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v not in ("", None)})
    out = []
    prev = {"train/student_updates": 0.0, "train/fake_updates": 0.0}
    for step in sorted(merged):
        r = merged[step]

        def num(key):
            return float(r[key]) if key in r else None

        # Lightning repeats a metric's last value in later rows: a step's kind is the counter it advanced
        kind = "?"
        for key, name in (("train/student_updates", "student"), ("train/fake_updates", "fake")):
            if num(key) is not None and num(key) > prev[key]:
                kind = name
            if num(key) is not None:
                prev[key] = num(key)
        mem = num("train/peak_mem_gib")
        out.append({"step": step, "step_s": num("train/step_s"), "mfu": num("train/mfu"),
                    "peak_mem_gib": mem if mem is not None else num("train/peak_rss_gib"),
                    "mem_kind": "gpu" if mem is not None else "cpu_rss", "kind": kind})
    return out


def summarize(steps: list[dict], skip: int, student_update_freq: int) -> dict:
    """Step time / MFU of the measured steps (after `skip`) and the run's peak memory.

    With student and fake-score steps both measured, step_s and mfu are those of one schedule cycle:
    (t_s + (f - 1)·t_f) / f and (m_s·t_s + (f - 1)·m_f·t_f) / (t_s + (f - 1)·t_f), t = median time,
    m = median MFU of each kind, f = student_update_freq; otherwise the medians of all measured steps."""
    measured = [s for s in steps[skip:] if s["step_s"] is not None]
    if not measured:
        raise ValueError(f"no timed steps after the first {skip} (logged: {len(steps)}); raise --steps")
    out: dict = {"measured_steps": len(measured)}
    mems = [s["peak_mem_gib"] for s in steps if s["peak_mem_gib"] is not None]
    out["peak_mem_gib"] = max(mems) if mems else None
    out["mem_kind"] = steps[-1]["mem_kind"] if steps else None
    by_kind = {}
    for kind in ("student", "fake"):
        rows = [s for s in measured if s["kind"] == kind]
        if rows:
            mfus = [s["mfu"] for s in rows if s["mfu"] is not None]
            by_kind[kind] = {"n": len(rows), "step_s": statistics.median(s["step_s"] for s in rows),
                             "mfu": statistics.median(mfus) if mfus else None}
    out["by_kind"] = by_kind
    f = student_update_freq
    if "student" in by_kind and "fake" in by_kind:
        ts, tf = by_kind["student"]["step_s"], by_kind["fake"]["step_s"]
        out["step_s"] = (ts + (f - 1) * tf) / f
        ms, mf = by_kind["student"]["mfu"], by_kind["fake"]["mfu"]
        out["mfu"] = (ms * ts + (f - 1) * mf * tf) / (ts + (f - 1) * tf) if ms is not None and mf is not None else None
        out["how"] = f"cycle of 1 student + {f - 1} fake-score steps (medians per kind)"
    else:
        out["step_s"] = statistics.median(s["step_s"] for s in measured)
        mfus = [s["mfu"] for s in measured if s["mfu"] is not None]
        out["mfu"] = statistics.median(mfus) if mfus else None
        out["how"] = "median of the measured steps"
    return out


def print_steps(name: str, steps: list[dict], skip: int) -> None:
    print(f"\n{name}: per step ({'measured' if skip == 0 else f'first {skip} = warm-up'})")
    print(f"{'step':>5} {'kind':>8} {'step_s':>9} {'mfu':>7} {'peak_mem_gib':>13}")
    for i, s in enumerate(steps):
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        mark = " (warm-up)" if i < skip else ""
        print(f"{s['step']:>5} {s['kind']:>8} {f(s['step_s'], '9.3f')} {f(s['mfu'], '7.4f')} "
              f"{f(s['peak_mem_gib'], '13.2f')}{mark}")


# ----------------------------------------------------------------------------- 4. figures and JSON


def figures_of(name: str, summary: dict) -> dict[str, float]:
    p = FIGURE_PREFIX[name]
    out = {f"{p}_step_s": summary["step_s"]}
    if summary.get("mfu") is not None:
        out[f"{p}_step_mfu"] = summary["mfu"]
    if summary.get("peak_mem_gib") is not None and summary.get("mem_kind") == "gpu":
        out[f"{p}_peak_mem_gib"] = summary["peak_mem_gib"]
    if name == "fsdp2":  # the rCM issue's names for the full-rCM run
        out["rcm_1.3b_step_s"] = summary["step_s"]
        if f"{p}_step_mfu" in out:
            out["rcm_1.3b_step_mfu"] = out[f"{p}_step_mfu"]
        if f"{p}_peak_mem_gib" in out:
            out["rcm_1.3b_peak_mem_gib"] = out[f"{p}_peak_mem_gib"]
        for kind, v in summary["by_kind"].items():
            out[f"rcm_1.3b_{kind}_step_s"] = v["step_s"]
            if v["mfu"] is not None:
                out[f"rcm_1.3b_{kind}_step_mfu"] = v["mfu"]
    return out


def device_name() -> str:
    from bench_harness import device_label

    return device_label()


def write_json(figures: dict, out_dirs: list[Path]) -> list[Path]:
    """benchmarks/<tool>.json format of tools/bench_harness.Harness.write, into each of out_dirs."""
    from bench_harness import Harness, write_doc

    h = Harness(TOOL)
    for k, v in figures.items():
        h.figure(k, v)
    return write_doc(h.document(), TOOL, out_dirs)


def merge_into_cluster(figures: dict, path: Path) -> Path:
    """Add the cluster issue's figures to `path` (benchmarks/cluster.json), keeping the figures already
    there; device and command list each source ("cpu" figures of cpu_ddp_parity.py stay)."""
    doc = json.loads(path.read_text()) if path.exists() else {"device": "", "date": "", "command": "", "figures": {}}
    new = {k: figures[k] for k in CLUSTER_FIGURES if k in figures}
    if not new:
        raise ValueError("no cluster figure was measured: cluster.json left as it is")
    doc.setdefault("figures", {}).update(new)
    dev, cmd = device_name(), "python " + " ".join(sys.argv)

    def add(field: str, item: str) -> str:
        parts = [p for p in (doc.get(field) or "").split("; ") if p]
        return "; ".join(parts + ([item] if item not in parts else []))

    doc["device"] = add("device", f"{dev} (rcm_1.3b_*)")
    doc["command"] = add("command", cmd)
    doc["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the figures (default 3)")
    p.add_argument("--runs", default="fsdp2,zero2",
                   help=f"comma-separated runs among {list(RUNS)} (default fsdp2,zero2)")
    p.add_argument("--samples", type=int, default=4, help="random samples in the latent shard (default 4)")
    p.add_argument("--work", help="inputs and run directories here (default: a temporary directory, removed)")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds per run before it is stopped (default none)")
    p.add_argument("--expandable-segments", action="store_true",
                   help="run each training process with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    p.add_argument("--merge-into-cluster", action="store_true",
                   help="also merge the cluster figures into benchmarks/cluster.json (not with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny model and latents on the CPU (the zero2 run under strategy auto: DeepSpeed refuses "
                        "the CPU); writes rcm_step.json into the work directory only")
    p.add_argument("--recipe", default=str(RECIPE), help="the rCM recipe (default recipes/wan2.1-1.3b/rcm.yaml)")
    p.add_argument("--set", dest="extra_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override added to every run, after the tool's own (repeatable), e.g. "
                        "model.activation_checkpointing=20 to recompute only the first 20 blocks")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = build_parser().parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if r not in RUNS:
            raise SystemExit(f"--runs: unknown run {r!r}; choose among {list(RUNS)}")
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    if args.tiny and args.merge_into_cluster:
        raise SystemExit("--merge-into-cluster: not with --tiny (tiny figures never go to benchmarks/)")
    recipe = Path(args.recipe).resolve()
    from turbo_train.recipe import load_recipe

    try:  # a bad --set is an error here, before any GPU time, naming the key
        freq = load_recipe(recipe, args.extra_sets).method.rcm.student_update_freq
    except ValueError as e:
        raise SystemExit(f"bench_rcm_step: {e}") from None

    tmp = tempfile.TemporaryDirectory(prefix="bench_rcm_step-") if args.work is None else None
    work = Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        inputs = write_inputs(work, TINY if args.tiny else FULL, args.samples)
        figures, failures, summaries = {}, {}, {}
        for name in runs:
            run_dir = work / f"run-{name}"
            sets = common_overrides(inputs, run_dir, args.steps, args.tiny) + run_overrides(name, args.tiny) \
                + args.extra_sets
            res = launch(name, recipe, sets, run_dir, args.run_timeout, args.expandable_segments)
            if os.environ.get("OUT") and not args.tiny:
                keep_logs(run_dir, Path(os.environ["OUT"]) / "rcm_step_logs" / name)
            if not res["ok"]:
                failures[name] = res["why"]
                continue
            steps = read_steps(run_dir)
            print_steps(name, steps, args.skip)
            summaries[name] = s = summarize(steps, args.skip, freq)
            figures.update(figures_of(name, s))
        print(f"\n{'run':>10} {'step_s':>9} {'mfu':>7} {'peak_GiB':>9}  how")
        for name in runs:
            if name in failures:
                print(f"{name:>10} {'-':>9} {'-':>7} {'-':>9}  FAILED: {failures[name]}")
                continue
            s = summaries[name]
            mfu = f"{s['mfu']:7.4f}" if s["mfu"] is not None else f"{'-':>7}"
            mem = f"{s['peak_mem_gib']:9.2f}" if s["peak_mem_gib"] is not None else f"{'-':>9}"
            print(f"{name:>10} {s['step_s']:9.3f} {mfu} {mem}  {s['how']} over {s['measured_steps']} steps"
                  + (" (peak = CPU RSS)" if s["mem_kind"] == "cpu_rss" else ""))
        if "zero2" in runs and "zero2" not in failures:
            print("note: zero2 ran with ema.kind=none (DeepSpeed under bf16-mixed casts an EMA copy to bf16): compare "
                  "it with fsdp2_noema, not with fsdp2"
                  + (" (tiny: under strategy auto, DeepSpeed refuses the CPU)" if args.tiny else ""))
        print("\nfigures:")
        for k, v in figures.items():
            print(f"  {k} = {v:.6g}")
        if figures:
            if args.tiny:
                paths = write_json(figures, [work / "benchmarks"])
                if args.work is None:  # the temporary directory goes away: show the JSON
                    print(paths[0].read_text())
            else:
                dirs = [ROOT / "benchmarks"] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
                paths = write_json(figures, dirs)
                if args.merge_into_cluster:
                    paths.append(merge_into_cluster(figures, ROOT / "benchmarks" / "cluster.json"))
                    if os.environ.get("OUT"):
                        import shutil

                        shutil.copy(ROOT / "benchmarks" / "cluster.json", Path(os.environ["OUT"]) / "cluster.json")
                        paths.append(Path(os.environ["OUT"]) / "cluster.json")
            log("wrote " + ", ".join(map(str, paths)))
        for name, why in failures.items():
            log(f"run {name} failed ({why}): its figures are absent")
        return 1 if failures else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
