"""Where a DiT's time goes: attention / linear / other, from one torch.profiler run (tools/bench_e2e.py).

Method. While profiling, forward hooks open a profiler scope around every self-attention backend
(`blocks.N.self_attn.attn`: sdpa, sla, sage, sagesla) and every nn.Linear / W8A8Linear. Each
CUDA kernel on the GPU timeline is charged once to the CPU op that launched it (its linked
correlation id is that op's id), and that op's chain of parents decides the class:

    attention  anything launched inside an attention-backend scope (also its torch GEMMs, e.g.
               sagesla's linear branch, and SLA's proj_l) or inside aten::scaled_dot_product_attention
               (the cross-attention, which is inline SDPA, not a module)
    linear     anything inside a Linear / W8A8Linear scope: cuBLAS GEMMs, bias epilogues, our W8A8
               per-token quantization and fp8/int8 GEMM kernels
    other      the rest: norms, modulation, RoPE, GELU, residual adds, patchify, casts, copies

Kernels that the profiler did not link to a CPU op, or linked to one outside every scope, are classified by
kernel name (`name_class`): the runtime's fused paths (a block's residual added in the output projection's
GEMM, the norm + quantization pass feeding q, k, v) skip the Linear's forward and so its scope; the hooks are
marked `profiler_scope` so that those paths still run while profiling.
The scopes themselves also appear on the GPU timeline (user annotations spanning their kernels);
they are not kernels and are left out (counting them charged each span twice: the 2026-12-04 run's
negative `other`). Times are summed kernel time on the GPU; `split_wall` turns them into seconds
that add up to a measured wall time. On the CPU (the tool's --tiny smoke run) the same scopes
classify each op's self CPU time.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn

CLASSES = ("attention", "linear", "other")
ATTENTION_SCOPE = "turbo::attention"
LINEAR_SCOPE = "turbo::linear"
SCOPES = (ATTENTION_SCOPE, LINEAR_SCOPE)
# Kernel-name fallback (lower case substrings), for kernels the profiler links to no CPU op.
ATTENTION_KEYS = ("attention", "attn", "flash", "fmha", "sdpa", "_sla_", "sla_", "lowbit", "sage", "_pool_kernel",
                  "block_map", "_quant_v_kernel", "_quant_int8_block")
LINEAR_KEYS = ("gemm", "matmul", "scaled_mm", "_int_mm", "w8a8", "quantize_rows", "nvjet", "cutlass", "xmma",
               "cublas", "gemv", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")


def name_class(name: str) -> str:
    """Class of a kernel or op from its name alone (attention keys first: our attention kernels
    also contain 'gemm'-like words)."""
    n = name.lower()
    if any(k in n for k in ATTENTION_KEYS):
        return "attention"
    if any(k in n for k in LINEAR_KEYS):
        return "linear"
    return "other"


def module_kind(name: str, module: nn.Module) -> str | None:
    """'attention' for a self-attention backend, 'linear' for nn.Linear / W8A8Linear, else None."""
    from turbo_infer.quant import W8A8Linear

    if name.endswith("self_attn.attn"):
        return "attention"
    if isinstance(module, (nn.Linear, W8A8Linear)):
        return "linear"
    return None


@contextmanager
def profiler_scopes(model: nn.Module):
    """Open a `turbo::attention` / `turbo::linear` profiler scope around each classified module's
    forward while the context is active (hooks removed on exit)."""
    stack: list = []
    handles = []

    def pre(kind):
        def hook(module, args):
            rf = torch.profiler.record_function(ATTENTION_SCOPE if kind == "attention" else LINEAR_SCOPE)
            rf.__enter__()
            stack.append(rf)
        hook.profiler_scope = True  # not a data hook: the runtime keeps its fused paths (quant.has_data_hooks)
        return hook

    def post(module, args, output):
        stack.pop().__exit__(None, None, None)
    post.profiler_scope = True

    for name, m in model.named_modules():
        kind = module_kind(name, m)
        if kind is not None:
            handles.append(m.register_forward_pre_hook(pre(kind)))
            handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def scope_class(event) -> str | None:
    """Class from the event's chain of CPU parents (attention wins over linear), None if no scope."""
    linear = False
    e = event
    while e is not None:
        if e.name == ATTENTION_SCOPE or "scaled_dot_product" in e.name:
            return "attention"
        linear = linear or e.name == LINEAR_SCOPE
        e = e.cpu_parent
    return "linear" if linear else None


def is_annotation(event) -> bool:
    """A record_function range mirrored on the GPU timeline (a span, not a kernel)."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name in SCOPES


def split_wall(seconds: dict, wall: float, *, eager: bool) -> dict:
    """Kernel seconds per class -> {class: s} that add up to `wall`, the measured seconds of the run.

    attention and linear keep their kernel seconds and other = wall - both (norms, elementwise work
    and launch gaps), unless the profiled kernels add up to more than the wall time (the profiler
    slows kernels a little; seen on the eager baseline): then every class is scaled by wall / kernel
    total. eager: the profiled run IS the timed one, so its `other` kernels count towards that total;
    for a compiled headline only attention and linear do (compiling fuses the eager `other` kernels
    but not our attention / W8A8 kernels, which are custom ops)."""
    keys = CLASSES if eager else ("attention", "linear")
    total = sum(seconds[k] for k in keys)
    f = min(1.0, wall / total) if total > 0 else 1.0
    att, lin = seconds["attention"] * f, seconds["linear"] * f
    return {"attention": att, "linear": lin, "other": max(0.0, wall - att - lin)}


def _device_records(prof, events) -> list[tuple[str, float, int, bool]]:
    """(name, microseconds, linked correlation id, is a scope's span) of every event on the GPU timeline.

    torch >= 2.13's FunctionEvent carries the linked correlation id; torch 2.11's (the GPU machine's) does
    not (the 2026-12-04 H200 run linked 0 % of its kernels through it), so there the raw Kineto events
    give it (`prof.profiler.kineto_results`, one per GPU activity)."""
    from torch.autograd import DeviceType

    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    if not gpu or hasattr(gpu[0], "linked_correlation_id"):
        return [(e.name, e.time_range.end - e.time_range.start, e.linked_correlation_id, is_annotation(e))
                for e in gpu]
    records = []
    for r in prof.profiler.kineto_results.events():
        if r.device_type() != DeviceType.CUDA:
            continue
        span = getattr(r, "is_user_annotation", None)
        annotation = bool(span()) if callable(span) else False
        records.append((r.name(), r.duration_ns() / 1e3, r.linked_correlation_id(),
                        annotation or r.name() in SCOPES))
    return records


def _launching_ops(events) -> dict:
    """{correlation id: CPU op} of the frontend ops that launch kernels. Runtime calls (cudaLaunchKernel,
    also CPU events) carry a linked id of their own and ids from another counter that can collide with
    the ops': where FunctionEvent has linked_correlation_id they are left out by it, else (torch 2.11)
    only ops that the profiler gave kernels count (runtime calls get none); on a collision an op wins
    over a scope."""
    from torch.autograd import DeviceType

    ops = {}
    for e in events:
        if e.device_type != DeviceType.CPU or getattr(e, "is_async", False):
            continue
        if getattr(e, "linked_correlation_id", 0) or (not hasattr(e, "linked_correlation_id") and not e.kernels):
            continue
        prev = ops.get(e.id)
        if prev is None or (prev.name in SCOPES and e.name not in SCOPES):
            ops[e.id] = e
    return ops


def classify(prof, device_type: str) -> dict:
    """Seconds per class over the profiled region -> {"seconds": {class: s}, "top": {class: [(name,
    s), ...]}, "total_s": all kernel (or op) time, "linked_fraction": share of it charged through a
    CPU op}. device_type: "cuda" (kernel time) or "cpu" (self CPU time of ops)."""
    from torch.autograd import DeviceType

    totals = dict.fromkeys(CLASSES, 0.0)
    per_name = {c: Counter() for c in CLASSES}
    events = prof.events()

    def add(cls, name, us):
        totals[cls] += us
        per_name[cls][name] += us

    if device_type == "cuda":
        # Each kernel once, from the GPU timeline, charged to the CPU op whose id is its correlation id.
        # (Walking the CPU ops' `kernels` lists instead counted some kernels more than once on torch
        # 2.11: 146 % of the GPU's kernel time was "linked" in the 2026-12-04 H200 baseline.)
        cpu_ops = _launching_ops(events)
        linked_us = total = 0.0
        for name, us, linked, annotation in _device_records(prof, events):
            if annotation:
                continue
            op = cpu_ops.get(linked or -1)
            cls = scope_class(op) if op is not None else None
            add(cls or name_class(name), name, us)
            total += us
            linked_us += us if op is not None else 0.0
        linked_fraction = linked_us / total if total else 1.0
    else:
        for e in events:
            if e.device_type == DeviceType.CPU:
                add(scope_class(e) or name_class(e.name), e.name, e.self_cpu_time_total)
        total = sum(totals.values())
        linked_fraction = 1.0
    top = {c: [(n, us / 1e6) for n, us in per_name[c].most_common(5)] for c in CLASSES}
    return {"seconds": {c: us / 1e6 for c, us in totals.items()}, "top": top, "total_s": total / 1e6,
            "linked_fraction": linked_fraction}


def profile_breakdown(model: nn.Module, fn, device_type: str) -> dict:
    """Run fn() once under torch.profiler with the scopes of `model` -> `classify`'s result."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profiler_scopes(model), profile(activities=activities) as prof:
        fn()
        if device_type == "cuda":
            torch.cuda.synchronize()
    return classify(prof, device_type)


def format_top(result: dict) -> str:
    """The five largest kernels (or ops) of each class, one line each, for the log."""
    lines = []
    for c in CLASSES:
        for name, s in result["top"][c]:
            lines.append(f"    {c:>9} {s * 1e3:10.2f} ms  {name[:110]}")
    return "\n".join(lines)


def breakdown_chart(path, dit: dict, pipeline: dict, title: str) -> None:
    """Bar-chart PNG: left, the DiT's attention/linear/other/total seconds for each variant in
    `dit` ({label: {class or "total": s}}), log scale; right, the turbo pipeline's stages
    (`pipeline`: {stage: s}) as one stacked bar, linear scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    cats = [*CLASSES, "total"]
    width = 0.8 / max(1, len(dit))
    for i, (label, vals) in enumerate(dit.items()):
        xs = [j + (i - (len(dit) - 1) / 2) * width for j in range(len(cats))]
        ys = [max(vals.get(c, 0.0), 1e-4) for c in cats]
        bars = ax1.bar(xs, ys, width, label=label)
        for b, y in zip(bars, ys):
            ax1.annotate(f"{y:.3g}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(range(len(cats)), cats)
    ax1.set_yscale("log")
    ax1.set_ylabel("seconds per video (log)")
    ax1.set_title("DiT")
    ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1)
    left = 0.0
    for stage, s in pipeline.items():
        ax2.barh([0], [s], left=left, label=f"{stage} {s:.3g} s")
        left += s
    ax2.set_yticks([])
    ax2.set_xlabel("seconds")
    ax2.set_title(f"turbo pipeline, {left:.3g} s")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["CLASSES", "breakdown_chart", "classify", "format_top", "module_kind", "name_class", "profile_breakdown",
           "profiler_scopes", "scope_class"]
