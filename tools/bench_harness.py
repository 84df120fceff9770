"""Shared GPU benchmark harness: providers x modes x metrics in one process, one JSON per tool.

Each tools/bench_<op>.py only builds its inputs and callables and hands them to a `Harness`:

    h = Harness("attention")                       # -> benchmarks/attention.json
    ms = h.measure("1.3b", "cudnn", "fwd", fn)     # median ms, CUDA events, L2 flushed per rep
    h.measure("1.3b", "ours", "bwd", backward_fn(lambda: f(q, k, v), [q, k, v]))
    h.figure("sla_fwd_speedup_1.3b_topk0.1", dense_ms / ours_ms)
    h.print_table(); h.write()

The JSON is {"device", "date", "command", "figures": {name: number}}; it is written to
benchmarks/<tool>.json, and also to $OUT/<tool>.json when $OUT is set (the device tool's
return folder). Timing follows the device tool's METHOD.md: warm up first (compilation and
autotuning stay out), events around each call, median of many, and a 256 MiB write between
calls so that repeated runs do not measure the L2 cache.
"""
from __future__ import annotations

import datetime
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from turbo_infer.files import write_json  # noqa: E402

MODES = ("fwd", "bwd", "full")  # forward; backward alone (graph built once, retained); forward+backward


def time_ms(fn: Callable[[], object], warmup_ms: float = 30.0, rep_ms: float = 150.0, max_reps: int = 500) -> float:
    """Median wall time of fn() on the current CUDA stream, in milliseconds."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    reps = min(max_reps, max(5, int(rep_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during one fn() call beyond what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_proj(D: int, seed: int = 1, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """A trained-like SLA proj_l (weight (D, D) / sqrt(D), bias 0.1 N(0, 1)), fp32: a fresh layer's is zero, which
    would leave the linear branch's output all zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(D, D, device=device, generator=g) / math.sqrt(D)
    return w, 0.1 * torch.randn(D, device=device, generator=g)


def backward_fn(forward: Callable[[], torch.Tensor], inputs: Iterable[torch.Tensor], seed: int = 0) -> Callable[[], None]:
    """A callable that runs only the backward of forward() (built once, graph retained).

    inputs are the leaves whose .grad is reset before each call, so that gradient accumulation
    does not add a read-modify-write that a training step would not have.
    """
    inputs = list(inputs)
    out = forward()
    gen = torch.Generator(device=out.device).manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)

    def run():
        for t in inputs:
            t.grad = None
        out.backward(grad, retain_graph=True)

    return run


def full_fn(forward: Callable[[], torch.Tensor], inputs: Iterable[torch.Tensor], seed: int = 0) -> Callable[[], None]:
    """A callable running forward() and its backward (a training step's attention)."""
    inputs = list(inputs)
    grad = None

    def run():
        nonlocal grad
        for t in inputs:
            t.grad = None
        out = forward()
        if grad is None:
            gen = torch.Generator(device=out.device).manual_seed(seed)
            grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        out.backward(grad)

    return run


class Harness:
    """Collects measurements (case x provider x mode) and named figures; prints and writes them."""

    def __init__(self, tool: str):
        self.tool = tool
        self.rows: list[dict] = []
        self.figures: dict[str, float] = {}

    def measure(self, case: str, provider: str, mode: str, fn: Callable[[], object], *, memory: bool = False,
                **extra) -> float:
        """Time fn (and optionally its peak memory); record and return the median ms."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        ms = time_ms(fn)
        row = dict(case=case, provider=provider, mode=mode, ms=ms, **extra)
        if memory:
            row["mem_mib"] = peak_mib(fn)
        self.rows.append(row)
        print(f"  {case:>14} {provider:>22} {mode:>4} {ms:10.3f} ms" + "".join(f"  {k}={v}" for k, v in extra.items()),
              flush=True)
        return ms

    def note(self, case: str, provider: str, mode: str, **values) -> None:
        """Record a non-timing row (an error, a ratio) for the table."""
        self.rows.append(dict(case=case, provider=provider, mode=mode, **values))

    def figure(self, name: str, value: float) -> None:
        if not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"figure {name!r} must be a finite number, got {value!r}")
        self.figures[name] = float(value)

    def print_table(self) -> None:
        keys = [k for k in dict.fromkeys(k for r in self.rows for k in r) if k not in ("case", "provider", "mode")]
        print(f"\n{'case':>14} {'provider':>22} {'mode':>4} " + " ".join(f"{k:>12}" for k in keys))
        for r in self.rows:
            cells = []
            for k in keys:
                v = r.get(k, "")
                cells.append(f"{v:12.4g}" if isinstance(v, float) else f"{str(v):>12}")
            print(f"{r['case']:>14} {r['provider']:>22} {r['mode']:>4} " + " ".join(cells))
        print("\nfigures:")
        for k, v in self.figures.items():
            print(f"  {k} = {v:.4g}")

    def document(self, **extra) -> dict:
        """The {"device", "date", "command", "figures", **extra} JSON document of this run."""
        return benchmark_doc(self.figures, **extra)

    def write(self, out_dir: str | os.PathLike | None = None, **extra) -> list[Path]:
        """Write <tool>.json (extra: more top-level fields, e.g. notes) to benchmarks/ (or out_dir) and,
        when set, to $OUT."""
        dirs = [Path(out_dir) if out_dir else REPO / "benchmarks"]
        if os.environ.get("OUT"):
            dirs.append(Path(os.environ["OUT"]))
        paths = write_doc(self.document(**extra), self.tool, dirs)
        print(f"wrote {', '.join(map(str, paths))}")
        return paths


def write_doc(doc: dict, tool: str, dirs) -> list[Path]:
    """Write doc as <dir>/<tool>.json into each of dirs (created if needed, atomically); returns the paths."""
    return [write_json(Path(d) / f"{tool}.json", doc) for d in dirs]


def device_label(device: str | torch.device | None = None) -> str:
    """Where figures were measured, for the "device" field: the CUDA device's name (device None = the
    current GPU when there is one), else "CPU (N cores)"."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def benchmark_doc(figures: dict, *, device: str | None = None, command: str | None = None, **extra) -> dict:
    """The benchmarks/<tool>.json document {"device", "date", "command", "figures", **extra}: device
    defaults to `device_label()`, command to this process's command line, date to now (UTC)."""
    return {
        "device": device if device is not None else device_label(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command if command is not None else "python " + " ".join(sys.argv),
        "figures": figures,
        **extra,
    }
