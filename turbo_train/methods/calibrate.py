"""W8A8 calibration: activation statistics, static scales, per-layer sensitivity -> a mixed-precision plan.

DESIGN.md "W8A8 linear": run N prompts through the full-precision (distilled, SLA-tuned) model with
the sampler it will ship with, so every Linear sees the inputs of every timestep it will meet, and

1. statistics: per Linear, the running amax of |x| and a streaming histogram of |x| (`AbsHistogram`)
   giving percentiles without a second pass;
2. static scales (per tensor, x ≈ q·scale): int8 clips at the `percentile` of |x| (a few outliers
   would otherwise spend the 127 levels), fp8 e4m3 at the amax (its exponent covers the range):
       scale_int8 = P_p(|x|) / 127,     scale_fp8 = amax(|x|) / 448;
3. sensitivity: the WHOLE model's error when only that layer is quantized (every other layer
   float), as the relative MSE of the final velocity over the calibration inputs,
       e_l,f = Σ ||v_q(l,f) − v||² / Σ ||v||²,
   for each format f; layers in block k reuse the float states entering block k (only blocks k..L
   are re-run, half the cost of full forwards on average). The same runs also give the layer's own
   output error d_l,f = Σ ||y_q − y||² / Σ ||y||² (y = the float layer on the same input): a layer
   whose branch is gated down contributes little to v even when quantization destroys it, and d
   catches that (an int8 layer with 1e3x outlier channels: d ≈ 1 while e stayed at 3e-3 on a tiny
   random model);
4. plan: a format is usable for a layer when e_l,f <= `error_budget` and d_l,f <=
   `layer_error_budget` (`format_ok`); the layer gets its usable format of lowest e, else bf16.
   Never quantized: SLA's proj_l, the patch embedding, the head (DESIGN.md), and the time
   embedding / projection (one row per sample: nothing to gain, and they feed every modulation).

The plan is JSON (`validate_plan` documents the schema); turbo-export reads it, picks per target the
target's format for every layer that `format_ok` allows in that format, and writes the
static scales when the plan's `activations` is "static" (dynamic per-token scales otherwise).
Method `calibrate` of `turbo-train` runs this (`run_calibration`); it trains nothing, so it is a
plain function pipeline rather than a Lightning module.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from turbo_infer.quant import DEFAULT_EXCLUDE, PRECISIONS, W8A8Linear, quantizable_linears
from turbo_infer.samplers import SAMPLERS, batch_randn, flow_schedule, get_sampler
from turbo_kernels.gemm.quantize import QMAX

if TYPE_CHECKING:  # recipe.py imports this module for CalibrateConfig: import it back lazily only
    from turbo_train.recipe import Recipe

PLAN_FORMAT = "turbo-w8a8-plan"
PLAN_VERSION = 1
FORMATS = ("int8", "fp8")
# Linears that always stay in floating point (matched against the dotted path's components).
KEEP_FLOAT = DEFAULT_EXCLUDE + ("time_embedding", "time_projection")
CALIBRATION_SEED_OFFSET = 20_000_000  # toy calibration captions live apart from training and eval seeds


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class CalibrateConfig:
    """Settings of method `calibrate` (recipe section method.calibrate). The model, its checkpoint and
    attention backend come from the recipe's `model` section, the device and dtype from `trainer`
    (accelerator; precision auto = bf16 on a GPU, fp32 on the CPU), the output directory from `logging`."""

    # prompts: a text file, one prompt per non-blank line (the first num_prompts are used); None = toy
    # captions from the toy generator (toy preset only; Wan presets need a file)
    prompts_file: str | None = None
    num_prompts: int = 8  # calibration prompts, >= 1
    batch_size: int = 8  # prompts per sampler batch, and calibration inputs per sensitivity forward, >= 1
    sampler: str = "rcm"  # the sampler the bundle will ship with (a turbo_infer.samplers name)
    steps: int = 4  # its steps (rcm: 1-4); every step's inputs are recorded
    guidance: float = 1.0  # CFG weight for euler/unipc (1 = conditional only); rcm ignores it
    shift: float | None = None  # timestep shift for euler/unipc; None = the world's default (toy 3, Wan 5)
    # video size of the calibration samples; None = the world's default (toy 8x64x64, Wan 81x480x832)
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0  # noise seed (prompt i uses seed + i) and toy caption seed
    # 8-bit formats to measure: both (the plan serves int8 and fp8 targets), or one of them
    formats: Literal["both", "int8", "fp8"] = "both"
    # how the exported layers quantize their inputs: static = the calibrated per-tensor scales (the default: on an
    # H100 the Wan-1.3B 4-step DiT ran ~6 % faster than with per-token ones, and the toy h100 bundles scored the same,
    # BENCHMARKS "Toy bundles"); dynamic = per-token scales at run time. Sensitivity is measured the same way.
    activations: Literal["dynamic", "static"] = "static"
    percentile: float = 99.99  # |x| percentile that sets the static int8 clip, in (0, 100] (100 = amax)
    histogram_bins: int = 2048  # bins of each layer's |x| histogram (even, >= 2)
    # largest relative MSE of the final velocity allowed when only one layer is quantized; layers
    # above it stay bf16. The toy teacher measured 1e-6..1e-4 for most layers (int8, dynamic).
    error_budget: float = 1e-3
    # largest relative MSE of the layer's own output (its branch may be gated down in v), > 0;
    # int8 per-token measures ~1e-4 and fp8 ~1.4e-3 on Gaussian data, a destroyed layer ~1
    layer_error_budget: float = 2e-2
    sensitivity_samples: int = 8  # calibration inputs (x_s, s, text) used for sensitivity, spread over steps; 0 = all
    # umT5 directory for Wan presets (the toy preset uses model.text_encoder / text_encoder_path)
    text_encoder_path: str | None = None
    plan_path: str | None = None  # where the plan JSON goes; None = <run_dir>/calibration_plan.json

    def __post_init__(self):
        from turbo_train.recipe import FieldError

        def need(ok, key, msg):
            if not ok:
                raise FieldError(key, msg)

        need(self.num_prompts >= 1, "num_prompts", f"must be >= 1, got {self.num_prompts}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.sampler in SAMPLERS, "sampler", f"must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        if self.sampler == "rcm":
            need(self.steps <= 4, "steps", f"the rcm sampler takes 1-4 steps, got {self.steps}")
        need(math.isfinite(self.guidance), "guidance", f"must be finite, got {self.guidance}")
        if self.shift is not None:
            need(self.shift > 0, "shift", f"must be > 0 or null, got {self.shift}")
        for k in ("num_frames", "height", "width"):
            v = getattr(self, k)
            need(v is None or v >= 1, k, f"must be >= 1 or null, got {v}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(0 < self.percentile <= 100, "percentile", f"must be in (0, 100], got {self.percentile}")
        need(self.histogram_bins >= 2 and self.histogram_bins % 2 == 0, "histogram_bins",
             f"must be an even number >= 2, got {self.histogram_bins}")
        need(self.error_budget > 0, "error_budget", f"must be > 0, got {self.error_budget}")
        need(self.layer_error_budget > 0, "layer_error_budget", f"must be > 0, got {self.layer_error_budget}")
        need(self.sensitivity_samples >= 0, "sensitivity_samples", f"must be >= 0, got {self.sensitivity_samples}")

    @property
    def format_list(self) -> list[str]:
        return list(FORMATS) if self.formats == "both" else [self.formats]


# ----------------------------------------------------------------------------- statistics


class AbsHistogram:
    """Streaming histogram of |x| with `bins` equal bins over [0, hi). hi starts at the power of two
    above the first amax and doubles (adjacent bins merge pairwise) whenever a larger value arrives,
    so percentiles need no first pass to find the range; resolution is hi / bins."""

    def __init__(self, bins: int = 2048):
        if not isinstance(bins, int) or bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even int >= 2, got {bins!r}")
        self.bins, self.hi, self.amax, self.total = bins, 0.0, 0.0, 0
        self.zeros = 0  # all-zero inputs seen before any range was known
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        if a.numel() == 0:
            return
        m = a.max().item()
        if not math.isfinite(m):
            raise ValueError("activation statistics: non-finite input (inf/nan) reached a Linear")
        self.total += a.numel()
        self.amax = max(self.amax, m)
        if m == 0.0 and self.hi == 0.0:
            self.zeros += a.numel()
            return
        if self.hi == 0.0:
            self.hi = 2.0 ** math.ceil(math.log2(m))
        while m > self.hi:  # double the range: bins 2i and 2i+1 become bin i
            self.counts = torch.cat([self.counts.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.hi *= 2.0
        self.counts += torch.histc(a, self.bins, 0.0, self.hi).double().cpu()

    def percentile(self, p: float) -> float:
        """Upper edge of the bin holding the p-th percentile of |x| (at most the amax); 0 if empty."""
        if self.total == 0 or self.hi == 0.0:
            return 0.0
        if p >= 100.0:
            return self.amax
        cum = torch.cumsum(self.counts, 0) + self.zeros
        idx = int(torch.searchsorted(cum, torch.tensor(p / 100.0 * self.total, dtype=torch.float64)).item())
        return min(self.amax, (min(idx, self.bins - 1) + 1) * self.hi / self.bins)


@contextmanager
def collect_statistics(model: nn.Module, names: list[str], bins: int = 2048):
    """Within the block, every forward of the Linears `names` feeds their input into an AbsHistogram.
    Yields {name: AbsHistogram}."""
    stats = {n: AbsHistogram(bins) for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: stats[n].update(args[0]))
               for n in names]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def activation_scales(stats: dict[str, AbsHistogram], percentile: float) -> dict[str, dict]:
    """Per layer: amax, the percentile clip and the static scales (int8 at the percentile, fp8 at the
    amax; a layer whose inputs were all zero gets a tiny positive scale, which is exact for zeros)."""
    out = {}
    for name, h in stats.items():
        clip = h.percentile(percentile)
        out[name] = {"act_amax": h.amax, "act_percentile": clip,
                     "act_scale": {"int8": max(clip / QMAX["int8"], 1e-12), "fp8": max(h.amax / QMAX["fp8"], 1e-12)}}
    return out


# ----------------------------------------------------------------------------- calibration inputs


class _Recorder:
    """Stands in for the model inside a sampler: calls it and keeps each call's inputs (on the CPU)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, context):
        self.calls.append((x.detach().cpu(), t.detach().cpu(), context.detach().cpu()))
        return self.model(x, t, context)


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions of the toy generator (training templates, paraphrased), deterministic in seed."""
    from turbo_train.toyworld.generator import generate_sample

    return [generate_sample(CALIBRATION_SEED_OFFSET + seed * 100_003 + i).caption for i in range(n)]


def read_prompts(path, n: int) -> list[str]:
    """The first n non-blank lines of a prompts file (all of them if it has fewer)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"method.calibrate.prompts_file: not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"method.calibrate.prompts_file: no prompts in {p}")
    return prompts[:n]


def record_inputs(model, text_encoder, prompts: list[str], latent_shape, cfg: CalibrateConfig, *, shift: float,
                  device, dtype, progress: bool = False) -> list[tuple]:
    """Run the sampler over `prompts` (batches of cfg.batch_size; prompt i's noise seeded cfg.seed + i)
    and return every model call's (x, 1000·s, text states), each (B, ...) on the CPU."""
    sampler = get_sampler(cfg.sampler)
    calls = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="calibration prompts", disable=not progress):
        batch = prompts[start:start + cfg.batch_size]
        context = text_encoder.encode(batch).to(device)  # (B, L, D)
        cfg_on = cfg.sampler != "rcm" and cfg.guidance != 1.0
        uncond = text_encoder.empty_embedding().to(device) if cfg_on else None  # (1, L, D)
        gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + start + i) for i in range(len(batch))]
        noise = batch_randn(latent_shape, gens, device)  # (B, C, F, H, W)
        rec = _Recorder(model)
        sampler.sample(rec, noise, context, uncond=uncond, guidance=cfg.guidance, steps=cfg.steps, shift=shift,
                       dtype=dtype, generators=gens)
        calls += rec.calls
    return calls


def pick_samples(calls: list[tuple], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n rows (0 = all) spread evenly over all recorded calls -> (x, t, context) stacked on dim 0."""
    x, t, c = (torch.cat([call[i] for call in calls]) for i in range(3))
    if 0 < n < x.shape[0]:
        idx = torch.linspace(0, x.shape[0] - 1, n).round().long()
        x, t, c = x[idx], t[idx], c[idx]
    return x, t, c


# ----------------------------------------------------------------------------- sensitivity


class _Stop(Exception):
    pass


def block_inputs(model, x, t, context):
    """The float states entering blocks[0] for a batch: (tokens, e, ctx, rope), and what the forward's tail
    (`WanModel.output`) needs after the last block: (temb, grid, x, timestep). Captured with hooks on a forward
    stopped at the first block."""
    got = {}

    def at_block(mod, args):
        got["args"] = args
        raise _Stop

    def at_time(mod, args, out):
        got["temb"] = out.float()

    h1 = model.blocks[0].register_forward_pre_hook(at_block)
    h2 = model.time_embedding.register_forward_hook(at_time)
    try:
        model(x, t, context)
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()
    grid = tuple(s // p for s, p in zip(x.shape[2:], model.config.patch_size))
    timestep = torch.as_tensor(t, device=x.device)
    timestep = timestep.expand(x.shape[0]) if timestep.ndim == 0 else timestep
    return got["args"], (got["temb"], grid, x, timestep)


def run_from_block(model, k: int, state, tail) -> torch.Tensor:
    """Blocks k.. from `state` = (tokens, e, ctx, rope) entering block k, then the forward's own tail
    (`WanModel.output`: head, raster order, unpatchify, x0 -> velocity) -> the velocity model(x, t, context)
    returns. tail: (temb, grid, x, timestep) from `block_inputs`."""
    tokens, e, ctx, rope = state
    for block in model.blocks[k:]:
        tokens = block(tokens, e, ctx, rope)
    return model.output(tokens, *tail)  # (B, C, F, H, W), fp32


@contextmanager
def swapped(model: nn.Module, name: str, fmt: str, act_scale: float | None, local: list | None = None):
    """Within the block, Linear `name` is a W8A8Linear of format `fmt` (act_scale None = dynamic).
    local: a [Σ||y_q − y||², Σ||y||²] pair that each call of the layer adds its own output error to."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    orig = getattr(parent, child)
    q = W8A8Linear.from_linear(orig, fmt, act_scale)
    if local is not None:
        def measure(mod, args, y_q):
            y = orig(args[0])
            local[0] += (y_q.double() - y.double()).pow(2).sum().item()
            local[1] += y.double().pow(2).sum().item()
        q.register_forward_hook(measure)
    setattr(parent, child, q)
    try:
        yield q
    finally:
        setattr(parent, child, orig)


def _block_of(name: str, num_blocks: int) -> int | None:
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < num_blocks:
        return int(parts[1])
    return None


@torch.no_grad()
def layer_sensitivity(model, names: list[str], samples, formats: list[str], scales: dict | None = None, *,
                      batch_size: int = 8, device=None, dtype=None, progress: bool = False) -> dict[str, dict]:
    """{name: {fmt: (e, d)}}: e = relative MSE of the model's velocity when only `name` is quantized to
    fmt, Σ||v_q − v||² / Σ||v||² over `samples` = (x, t, context); d = the same for the layer's own
    output. scales: {name: {fmt: static scale}} (None = dynamic per-token scales). Layers of block k
    re-run only blocks k.. from the float states entering block k."""
    x_all, t_all, c_all = samples
    nb = len(model.blocks)
    by_block = {k: [n for n in names if _block_of(n, nb) == k] for k in range(nb)}
    outside = [n for n in names if _block_of(n, nb) is None]
    num = {n: dict.fromkeys(formats, 0.0) for n in names}
    local = {n: {f: [0.0, 0.0] for f in formats} for n in names}
    den = 0.0
    total = len(names) * len(formats) * math.ceil(x_all.shape[0] / batch_size)
    bar = tqdm(total=total, desc="layer sensitivity", disable=not progress)

    def err(v_q, v):
        return (v_q.double() - v.double()).pow(2).sum().item()

    def scale(n, f):
        return None if scales is None else scales[n][f]

    for i in range(0, x_all.shape[0], batch_size):
        x, t, c = (a[i:i + batch_size].to(device) for a in (x_all, t_all, c_all))
        x, c = x.to(dtype or x.dtype), c.to(dtype or c.dtype)
        v = model(x, t, c).float()  # float reference
        den += v.double().pow(2).sum().item()
        for n in outside:  # embeddings before the blocks: the whole forward
            for f in formats:
                with swapped(model, n, f, scale(n, f), local[n][f]):
                    num[n][f] += err(model(x, t, c), v)
                bar.update()
        state, tail = block_inputs(model, x, t, c)
        for k, block in enumerate(model.blocks):
            for n in by_block[k]:
                for f in formats:
                    with swapped(model, n, f, scale(n, f), local[n][f]):
                        num[n][f] += err(run_from_block(model, k, state, tail), v)
                    bar.update()
            tokens, e, ctx, rope = state
            state = (block(tokens, e, ctx, rope), e, ctx, rope)  # float states entering block k + 1
    bar.close()
    den = max(den, 1e-30)
    return {n: {f: (num[n][f] / den, local[n][f][0] / max(local[n][f][1], 1e-30)) for f in formats} for n in names}


@torch.no_grad()
def plan_error(model, precision: dict[str, str], samples, scales: dict | None = None, *, batch_size: int = 8,
               device=None, dtype=None) -> float:
    """Relative MSE of the velocity with every layer of `precision` quantized at once (bf16 = float)."""
    x_all, t_all, c_all = samples
    num = den = 0.0
    chosen = [(n, p) for n, p in precision.items() if p != "bf16"]
    for i in range(0, x_all.shape[0], batch_size):
        x, t, c = (a[i:i + batch_size].to(device) for a in (x_all, t_all, c_all))
        x, c = x.to(dtype or x.dtype), c.to(dtype or c.dtype)
        v = model(x, t, c).float()
        with _all_swapped(model, chosen, scales):
            v_q = model(x, t, c).float()
        num += (v_q.double() - v.double()).pow(2).sum().item()
        den += v.double().pow(2).sum().item()
    return num / max(den, 1e-30)


@contextmanager
def _all_swapped(model, chosen, scales):
    if not chosen:
        yield
        return
    (n, f), rest = chosen[0], chosen[1:]
    with swapped(model, n, f, None if scales is None else scales[n][f]), _all_swapped(model, rest, scales):
        yield


# ----------------------------------------------------------------------------- the plan


def format_ok(entry: dict, fmt: str, plan: dict) -> bool:
    """Whether a plan layer `entry` may run in 8-bit format `fmt`: calibrated in fmt, not pinned to
    bf16, e <= error_budget and d <= layer_error_budget (null errors = unusable). turbo-export
    decides each target's layers with this."""
    if entry["precision"] == "bf16" or fmt not in plan["formats"]:
        return False
    e, d = entry["sensitivity"][fmt], entry["layer_error"][fmt]
    return e is not None and d is not None and e <= plan["error_budget"] and d <= plan["layer_error_budget"]


def choose_precision(sensitivity: dict, layer_error: dict, budget: float, layer_budget: float) -> str:
    """The usable 8-bit format (e <= budget, d <= layer_budget; None = unusable) of lowest e, else bf16."""
    ok = {f: e for f, e in sensitivity.items()
          if e is not None and e <= budget and layer_error[f] is not None and layer_error[f] <= layer_budget}
    return min(ok, key=ok.get) if ok else "bf16"


def _finite(e: float) -> float | None:
    return e if math.isfinite(e) else None  # JSON has no inf/nan: null = unusable


@torch.no_grad()
def calibrate(model, text_encoder, prompts: list[str], latent_shape, cfg: CalibrateConfig, *, shift: float,
              device="cpu", dtype=torch.float32, progress: bool = False) -> dict:
    """Statistics, scales, sensitivity and the plan dict for `model` (eval mode, on `device`).

    latent_shape: (C, F, H, W) of one sample; shift: the sampler's timestep shift (euler/unipc)."""
    if getattr(model, "sequence_shard", None) is not None:
        raise ValueError("calibrate: run on one device (model.sequence_shard is set)")
    model.eval()
    names = quantizable_linears(model, KEEP_FLOAT)
    floats = sorted(set(quantizable_linears(model, ())) - set(names))
    formats = cfg.format_list
    # 1. sampler runs over the prompts, statistics hooks on
    with collect_statistics(model, names, cfg.histogram_bins) as stats:
        calls = record_inputs(model, text_encoder, prompts, latent_shape, cfg, shift=shift, device=device,
                              dtype=dtype, progress=progress)
    # 2. static scales
    layers = activation_scales(stats, cfg.percentile)
    static = {n: layers[n]["act_scale"] for n in names} if cfg.activations == "static" else None
    # 3. sensitivity of each layer alone
    samples = pick_samples(calls, cfg.sensitivity_samples)
    sens = layer_sensitivity(model, names, samples, formats, static, batch_size=cfg.batch_size, device=device,
                             dtype=dtype, progress=progress)
    # 4. decisions, and the error of each format's whole plan
    e_of = {n: {f: _finite(sens[n][f][0]) for f in formats} for n in names}
    d_of = {n: {f: _finite(sens[n][f][1]) for f in formats} for n in names}
    summary = {}
    for f in formats:
        chosen = {n: f if choose_precision({f: e_of[n][f]}, {f: d_of[n][f]}, cfg.error_budget,
                                           cfg.layer_error_budget) == f else "bf16" for n in names}
        summary[f] = {"quantized_layers": sum(p != "bf16" for p in chosen.values()),
                      "rel_mse_all": _finite(plan_error(model, chosen, samples, static, batch_size=cfg.batch_size,
                                                        device=device, dtype=dtype))}
    mods = dict(model.named_modules())
    out_layers = {}
    for n in names:
        out_layers[n] = {"precision": choose_precision(e_of[n], d_of[n], cfg.error_budget, cfg.layer_error_budget),
                         "in_features": mods[n].in_features, "out_features": mods[n].out_features,
                         "act_amax": layers[n]["act_amax"], "act_percentile": layers[n]["act_percentile"],
                         "act_scale": {f: layers[n]["act_scale"][f] for f in formats},
                         "sensitivity": e_of[n], "layer_error": d_of[n]}
    cfg_dict = model.config.to_dict()
    timesteps = SAMPLERS["rcm"].timesteps(cfg.steps) if cfg.sampler == "rcm" else flow_schedule(cfg.steps, shift)
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"config": {k: v for k, v in cfg_dict.items() if k not in ("attention", "attention_options")},
                  "attention": cfg_dict["attention"], "checkpoint": None, "checkpoint_sha256": {}},
        "calibration": {"sampler": cfg.sampler, "steps": cfg.steps, "timesteps": [float(s) for s in timesteps],
                        "guidance": cfg.guidance, "shift": shift, "prompts": len(prompts), "seed": cfg.seed,
                        "latent_shape": list(latent_shape), "inputs": sum(c[0].shape[0] for c in calls),
                        "sensitivity_inputs": int(samples[0].shape[0]), "percentile": cfg.percentile,
                        "histogram_bins": cfg.histogram_bins, "dtype": str(dtype).removeprefix("torch.")},
        "activations": cfg.activations,
        "error_budget": cfg.error_budget,
        "layer_error_budget": cfg.layer_error_budget,
        "formats": formats,
        "summary": summary,
        "float_layers": floats,
        "layers": out_layers,
    }


def _plan_fail(source, field, message):
    raise ValueError(f"{source}: field {field!r}: {message}")


def validate_plan(plan, source="plan") -> dict:
    """Check a plan's schema (see `calibrate`); raise ValueError naming the field. Returns plan.

    Required: format, version, model.config (a WanConfig dict), activations (dynamic | static),
    error_budget > 0, layer_error_budget > 0, formats ⊆ [int8, fp8], layers {name: {precision
    (int8 | fp8 | bf16, an 8-bit one only among formats), act_scale {fmt: > 0}, sensitivity and
    layer_error {fmt: >= 0 or null}}}."""
    from turbo_infer.models.wan import WanConfig

    def need(d, key, types, prefix=""):
        field = prefix + key
        if not isinstance(d, dict) or key not in d:
            _plan_fail(source, field, "missing")
        v = d[key]
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            _plan_fail(source, field, f"has the wrong type ({type(v).__name__}): {v!r}")
        return v

    if not isinstance(plan, dict):
        raise ValueError(f"{source}: a plan must be a JSON object, got {type(plan).__name__}")
    if need(plan, "format", str) != PLAN_FORMAT:
        _plan_fail(source, "format", f"must be {PLAN_FORMAT!r}, got {plan['format']!r}")
    if need(plan, "version", int) != PLAN_VERSION:
        _plan_fail(source, "version", f"this turbo reads version {PLAN_VERSION}, got {plan['version']}")
    config = need(need(plan, "model", dict), "config", dict, "model.")
    try:
        WanConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        _plan_fail(source, "model.config", str(e))
    if need(plan, "activations", str) not in ("dynamic", "static"):
        _plan_fail(source, "activations", f"must be 'dynamic' or 'static', got {plan['activations']!r}")
    for key in ("error_budget", "layer_error_budget"):
        budget = need(plan, key, (int, float))
        if not (budget > 0 and math.isfinite(budget)):
            _plan_fail(source, key, f"must be a finite number > 0, got {budget}")
    formats = need(plan, "formats", list)
    if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
        _plan_fail(source, "formats", f"must be a non-empty list of distinct {list(FORMATS)}, got {formats!r}")
    for name, entry in need(plan, "layers", dict).items():
        pre = f"layers.{name}."
        prec = need(entry, "precision", str, pre)
        if prec not in PRECISIONS:
            _plan_fail(source, pre + "precision", f"must be one of {list(PRECISIONS)}, got {prec!r}")
        if prec != "bf16" and prec not in formats:
            _plan_fail(source, pre + "precision", f"{prec!r} was not calibrated (formats: {formats})")
        scales = need(entry, "act_scale", dict, pre)
        for f in formats:
            s = need(scales, f, (int, float), pre + "act_scale.")
            if not (s > 0 and math.isfinite(s)):
                _plan_fail(source, f"{pre}act_scale.{f}", f"must be a finite number > 0, got {s}")
            for key in ("sensitivity", "layer_error"):
                e = need(need(entry, key, dict, pre), f, (int, float, type(None)), f"{pre}{key}.")
                if e is not None and not (e >= 0 and math.isfinite(e)):
                    _plan_fail(source, f"{pre}{key}.{f}", f"must be a finite number >= 0 or null, got {e}")
    floats = plan.get("float_layers", [])
    if not isinstance(floats, list) or not all(isinstance(n, str) for n in floats):
        _plan_fail(source, "float_layers", f"must be a list of layer names, got {floats!r}")
    return plan


def load_plan(path) -> dict:
    """Read and validate a plan JSON file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"plan not found: {p}")
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    return validate_plan(plan, str(p))


def write_plan(plan: dict, path) -> Path:
    """Validate and write the plan atomically (temporary file, then rename)."""
    validate_plan(plan, "the plan being written")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def summary_table(plan: dict) -> str:
    """A few lines: layers per precision, the budget, and each format's whole-plan error."""
    counts = {p: sum(e["precision"] == p for e in plan["layers"].values()) for p in PRECISIONS}
    lines = [f"calibration plan: {len(plan['layers'])} layers -> " + ", ".join(f"{p} {c}" for p, c in counts.items())
             + f" (+{len(plan['float_layers'])} always float); budgets: rel. MSE {plan['error_budget']:g} of v, "
             f"{plan['layer_error_budget']:g} of the layer's output; {plan['activations']} activations"]
    for f, s in plan["summary"].items():
        e = s["rel_mse_all"]
        lines.append(f"  {f}: {s['quantized_layers']} layers within budget, all at once: rel. MSE "
                     f"{'n/a' if e is None else format(e, '.3g')}")
    def worst_error(entry):
        return max(math.inf if e is None else e for e in entry["sensitivity"].values())

    worst = sorted(plan["layers"].items(), key=lambda kv: -worst_error(kv[1]))
    for n, e in worst[:3]:
        lines.append(f"  most sensitive: {n}: e {e['sensitivity']}, d {e['layer_error']} -> {e['precision']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- recipe entry


def check_calibrate_recipe(recipe: "Recipe") -> None:
    """Checks that need the whole recipe (runner.check_supported); ValueError naming the key."""
    c = recipe.method.calibrate
    if recipe.model.preset != "toy":
        if c.prompts_file is None:
            raise ValueError("method.calibrate.prompts_file: required for Wan presets (toy captions are toy-only)")
        if c.text_encoder_path is None:
            raise ValueError("method.calibrate.text_encoder_path: required for Wan presets (a local umT5 directory)")


def world_defaults(preset: str) -> dict:
    """Video size, latent factors and shift of the preset's world."""
    if preset == "toy":
        return dict(num_frames=8, height=64, width=64, spatial=4, temporal=1, shift=3.0)
    return dict(num_frames=81, height=480, width=832, spatial=8, temporal=4, shift=5.0)


def build_calibration_model(m):
    """The DiT of the recipe's model section (fp32, CPU). An SLA-tuned checkpoint (it holds proj_l
    tensors, e.g. the merged rCM + SLA student) keeps its own SLA attention and options when the
    recipe names a dense backend: the plan must describe the model turbo-export will ship."""
    from turbo_infer.layers.attention import SPARSE_BACKENDS
    from turbo_infer.models.wan import WanModel, checkpoint_config
    from turbo_infer.models.wan_keys import load_wan_state_dict
    from turbo_train.export import build_model

    cfg = m.wan_config()
    if m.checkpoint is None:
        return WanModel(cfg)
    state, file_cfg = load_wan_state_dict(m.checkpoint)
    cfg = checkpoint_config(state, file_cfg, m.checkpoint, cfg, **m.checkpoint_overrides())
    backend, options = cfg.attention, dict(cfg.attention_options)
    if any(".proj_l." in k for k in state) and backend not in SPARSE_BACKENDS:
        file_cfg = file_cfg or {}
        sparse = file_cfg.get("attention") in SPARSE_BACKENDS
        backend = file_cfg["attention"] if sparse else "sla"
        options = dict(file_cfg.get("attention_options") or {}) if sparse else {}
        print(f"calibrate: {m.checkpoint} is SLA-tuned (proj_l): calibrating with its {backend} attention "
              f"{options} instead of model.attention {cfg.attention!r}")
    return build_model(state, cfg, backend, options)


def run_calibration(recipe: "Recipe", run_dir, *, model=None, text_encoder=None, progress: bool | None = None) -> Path:
    """Method `calibrate` of turbo-train: build the model and text encoder of the recipe, calibrate,
    write the plan (method.calibrate.plan_path or <run_dir>/calibration_plan.json). model /
    text_encoder replace the recipe's (tests). Returns the plan's path."""
    from turbo_infer.bundle import checkpoint_sha256
    from turbo_infer.pipeline import check_video_size
    from turbo_train.methods.batching import build_text_encoder
    from turbo_train.runner import resolve_precision, uses_gpu

    check_calibrate_recipe(recipe)
    c, m = recipe.method.calibrate, recipe.model
    progress = recipe.logging.progress_bar if progress is None else progress
    device = torch.device("cuda" if uses_gpu(recipe) else "cpu")
    dtypes = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    dtype = dtypes[resolve_precision(recipe)]
    if model is None:
        model = build_calibration_model(m)
    model = model.to(device=device, dtype=dtype).eval()
    w = world_defaults(m.preset)
    if text_encoder is None:
        if m.preset == "toy":
            text_encoder = build_text_encoder(m, device)
        else:
            from turbo_infer.text_encoders import UMT5TextEncoder

            text_encoder = UMT5TextEncoder(c.text_encoder_path, device=device, dtype=dtype)
    prompts = read_prompts(c.prompts_file, c.num_prompts) if c.prompts_file else toy_prompts(c.num_prompts, c.seed)
    F, H, W = (getattr(c, k) or w[k] for k in ("num_frames", "height", "width"))
    try:
        check_video_size(F, H, W, spatial_factor=w["spatial"], temporal_factor=w["temporal"],
                         patch_size=model.config.patch_size)
    except ValueError as e:
        raise ValueError(f"method.calibrate: {e}") from None
    latent_frames = (F - 1) // w["temporal"] + 1 if w["temporal"] > 1 else F
    latent_shape = (model.config.in_channels, latent_frames, H // w["spatial"], W // w["spatial"])
    shift = c.shift if c.shift is not None else w["shift"]
    plan = calibrate(model, text_encoder, prompts, latent_shape, c, shift=shift, device=device, dtype=dtype,
                     progress=progress)
    if m.checkpoint is not None:
        plan["model"]["checkpoint"] = str(m.checkpoint)
        plan["model"]["checkpoint_sha256"] = checkpoint_sha256(m.checkpoint)
    path = write_plan(plan, c.plan_path or Path(run_dir) / "calibration_plan.json")
    print(summary_table(plan))
    print(f"turbo-train: wrote {path}")
    return path


__all__ = ["AbsHistogram", "CalibrateConfig", "KEEP_FLOAT", "activation_scales", "block_inputs",
           "build_calibration_model", "calibrate",
           "check_calibrate_recipe", "choose_precision", "format_ok", "collect_statistics", "layer_sensitivity",
           "load_plan",
           "pick_samples", "plan_error", "read_prompts", "record_inputs", "run_calibration", "run_from_block",
           "summary_table", "swapped", "toy_prompts", "validate_plan", "write_plan"]


def main(argv: list[str] | None = None) -> int:
    """`python -m turbo_train.methods.calibrate RECIPE [--set key=value ...]`: run a calibrate recipe
    directly (what `turbo-train RECIPE` does for method calibrate)."""
    import argparse

    from turbo_train.recipe import load_recipe

    p = argparse.ArgumentParser(prog="python -m turbo_train.methods.calibrate",
                                description="W8A8 calibration: statistics, static scales, sensitivity, plan JSON.")
    p.add_argument("recipe", help="a recipe with method.name: calibrate (e.g. recipes/toy/calibrate.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key (dotted); repeatable")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.method.name != "calibrate":
            raise ValueError(f"method.name: this entry point runs 'calibrate', the recipe says {recipe.method.name!r}")
        check_calibrate_recipe(recipe)
        if recipe.model.checkpoint is not None and not Path(recipe.model.checkpoint).exists():
            raise FileNotFoundError(f"model.checkpoint: not found: {recipe.model.checkpoint}")
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    run_calibration(recipe, recipe.resolved_run_dir(args.recipe))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
