"""Run several GPU jobs in one device call under one time budget, and pack what they wrote into one file.

    python tools/gpu_batch.py --deadline-s 570 --need webdataset,lightning \
        --run mfu="python tools/bench_rcm_step.py --runs fsdp2 --steps 6 --skip 3" \
        --run layer="python tools/bench_sla_layer.py --profile" \
        --collect benchmarks --collect runs/suite/summary.json

A lent GPU comes in calls of at most ten minutes, each returning at most a few files from $OUT; a call
that fails at once on a missing module, or a job that overruns and takes the others' results with it,
costs device time that a session does not get back. This runner:
  1. checks that every module of --need imports (else exits 3 before any job: nothing is spent);
  2. runs the --run jobs in order, each through bash with its output in logs/NAME.log, each stopped
     (SIGTERM, then SIGKILL) when the deadline, less --reserve-s for packing, comes; a job that would
     start with less than --min-job-s left is skipped;
  3. writes batch.json (per job: exit code, seconds, skipped / timed out) and packs it, the logs and
     every --collect path (files or folders, relative to the repository) into OUT/batch.tgz, the one
     file it leaves in OUT (its working files live in a temporary folder).
OUT is --out, else $OUT. Exit status: 0 when every job ran and exited 0, else 1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[gpu_batch {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_job(text: str) -> tuple[str, str]:
    name, sep, cmd = text.partition("=")
    if not sep or not name.isidentifier() or not cmd.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=COMMAND with NAME a word")
    return name, cmd


def missing_modules(names: list[str]) -> list[str]:
    out = []
    for n in names:
        try:
            importlib.import_module(n)
        except Exception as e:  # noqa: BLE001  (any import failure counts as missing)
            out.append(f"{n} ({type(e).__name__}: {e})")
    return out


def run_job(name: str, cmd: str, logs: Path, budget_s: float) -> dict:
    """Run one job with at most budget_s seconds; never raises."""
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as fh:
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = proc.returncode
    return {"job": name, "command": cmd, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "timed_out": timed_out, "skipped": False}


def pack(out: Path, work: Path, collect: list[str]) -> Path:
    """work (batch.json, logs/) plus the --collect paths into out/batch.tgz; absent paths are noted."""
    dest = out / "batch.tgz"
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(work, arcname="batch")
        for rel in collect:
            p = (REPO / rel).resolve()
            if p.exists():
                tar.add(p, arcname=f"collected/{rel}")
            else:
                log(f"--collect {rel}: not found, left out")
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", dest="jobs", action="append", type=parse_job, default=[], metavar="NAME=COMMAND",
                   help="a job (repeatable, run in order)")
    p.add_argument("--deadline-s", type=float, default=570.0, help="seconds from start until everything is packed")
    p.add_argument("--reserve-s", type=float, default=20.0, help="seconds kept back for packing (default 20)")
    p.add_argument("--min-job-s", type=float, default=30.0, help="skip a job that would get less (default 30)")
    p.add_argument("--need", default="", help="comma-separated modules that must import before any job runs")
    p.add_argument("--collect", action="append", default=[], metavar="PATH",
                   help="a file or folder (relative to the repository) to pack too (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="where batch.tgz goes (default $OUT)")
    a = p.parse_args(argv)
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        p.error("no output folder: pass --out or set $OUT")
    if not a.jobs:
        p.error("no jobs: pass at least one --run NAME=COMMAND")
    names = [n for n, _ in a.jobs]
    if len(set(names)) != len(names):
        p.error(f"job names must be unique, got {names}")
    if a.deadline_s <= a.reserve_s:
        p.error("--deadline-s must exceed --reserve-s")
    t0 = time.perf_counter()
    missing = missing_modules([m for m in a.need.split(",") if m])
    if missing:
        log("missing modules, no job run: " + "; ".join(missing))
        return 3
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_batch-"))  # outside OUT: only batch.tgz goes back
    (work / "logs").mkdir()
    results = []
    for name, cmd in a.jobs:
        left = a.deadline_s - a.reserve_s - (time.perf_counter() - t0)
        if left < a.min_job_s:
            log(f"skip {name}: {left:.0f} s left")
            results.append({"job": name, "command": cmd, "rc": None, "seconds": 0.0, "timed_out": False, "skipped": True})
            continue
        log(f"start {name} (at most {left:.0f} s)")
        r = run_job(name, cmd, work / "logs", left)
        log(f"{'timed out' if r['timed_out'] else 'done'} {name}: exit {r['rc']} in {r['seconds']} s")
        results.append(r)
    (work / "batch.json").write_text(json.dumps({"jobs": results, "total_s": round(time.perf_counter() - t0, 1)},
                                                indent=2) + "\n")
    dest = pack(out, work, a.collect)
    shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
    ok = all(r["rc"] == 0 and not r["timed_out"] and not r["skipped"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
