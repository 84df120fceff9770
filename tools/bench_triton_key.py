"""The first Triton launch of a fresh process, with and without Triton's compiler key computed early.

    python tools/bench_triton_key.py [--runs 3]

A kernel whose binary is in Triton's on-disk cache still costs its process's first launch the cache key's
`triton_key()` (a SHA-256 of Triton's ~500 MB library; `turbo_kernels.triton_key`). This tool fills the cache with
one small kernel, then starts fresh Python processes that each time that kernel's first launch: `cold` launches
at once; `early` starts `TritonKeyWarmup` first and sleeps 1 s (what a program's weight loading gives the thread)
before launching. Figures (medians over --runs processes, seconds): triton_first_launch_cold_s,
triton_first_launch_early_key_s, triton_key_s (the thread's own time). On a GPU (CUDA tensors); on a CPU under
TRITON_INTERPRET=1 the interpreter never builds a cache key, so there the tool only reports triton_key_s.
Writes benchmarks/triton_key.json (and $OUT/triton_key.json when set).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

CHILD = r"""
import json, sys, time
mode, device = sys.argv[1], sys.argv[2]
import torch, triton, triton.language as tl
from turbo_kernels.triton_key import TritonKeyWarmup

@triton.jit
def _add_one(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) + 1, mask=offs < N)

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

x = torch.zeros(1024, device=device)
sync()
out = {}
if mode == "early":
    w = TritonKeyWarmup()
    time.sleep(1.0)
    out["key_s"] = w.wait()
t = time.perf_counter()
_add_one[(4,)](x, 1024, BLOCK=256)
sync()
out["first_launch_s"] = time.perf_counter() - t
assert float(x[0]) == 1.0
print("RESULT " + json.dumps(out))
"""


def child(mode: str, device: str = "cuda") -> dict:
    """One fresh process timing the first launch of `_add_one` (mode cold or early) on `device` (a CPU needs
    TRITON_INTERPRET=1). The child is a file: @triton.jit reads its kernel's source, which `python -c` lacks."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="triton_key_") as d:
        script = Path(d) / "first_launch.py"
        script.write_text(CHILD)
        r = subprocess.run([sys.executable, str(script), mode, device], capture_output=True, text=True, env=env,
                           timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"child ({mode}) failed, exit {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="fresh processes per mode (>= 1)")
    a = p.parse_args()
    if a.runs < 1:
        p.error("--runs must be >= 1")
    from bench_harness import benchmark_doc, write_doc

    import torch

    from turbo_kernels.triton_key import TritonKeyWarmup

    figures = {}
    if torch.cuda.is_available():
        child("cold")  # fills Triton's cache with the kernel (and its launcher)
        cold = [child("cold")["first_launch_s"] for _ in range(a.runs)]
        early = [child("early") for _ in range(a.runs)]
        figures["triton_first_launch_cold_s"] = statistics.median(cold)
        figures["triton_first_launch_early_key_s"] = statistics.median(e["first_launch_s"] for e in early)
        figures["triton_key_s"] = statistics.median(e["key_s"] for e in early)
        print(f"first launch, cold: {[round(c, 3) for c in cold]} s; with the key computed early: "
              f"{[round(e['first_launch_s'], 3) for e in early]} s (key thread {[round(e['key_s'], 3) for e in early]} s)")
    else:
        w = TritonKeyWarmup()
        figures["triton_key_s"] = w.wait()
        print(f"no CUDA device: only the key's own time, {figures['triton_key_s']:.3f} s")
    dirs = [REPO / "benchmarks"] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for path in write_doc(benchmark_doc(figures), "triton_key", dirs):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
