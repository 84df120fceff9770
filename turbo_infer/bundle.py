"""Per-hardware bundles: the target table, the manifest schema and the loader (DESIGN.md "Bundles").

A bundle is a directory written by `turbo-export` (turbo_train/export.py):

    manifest.json            what to build and how to run it (schema: `validate_manifest`)
    transformer.safetensors  the DiT's tensors: int8/fp8 weights + fp32 scales and biases of the
                             W8A8 layers, every other tensor in the bundle's dtype (SLA's proj_l fp32)

Targets (DESIGN.md table; `TARGETS`):

    target    linears      attention (SLA-tuned / dense model)   dtype     min compute capability
    h100      fp8          sla / sage                             bf16      9.0
    a100      int8         sla / sdpa                             bf16      8.0
    rtx4090   int8         sagesla / sage                         bf16      8.9
    rtx5090   int8         sagesla / sage                         bf16      12.0
    cpu       float only   sla / sdpa (torch references)          fp32      none (runs anywhere)

The h100 sparse default is our bf16 SLA, not sagesla (DESIGN.md's table); `turbo-export --attention sagesla` gives
the low-bit sparse branch, which the end-to-end benchmark times. On an H100 (session 33, benchmarks/lowbit.json,
toy_bundles.json) the sagesla module runs 1.24x bf16 SLA at the 1.3B shape, topk 0.1, and a toy h100 bundle with
sagesla scores 0.988x the teacher's adherence against 0.991x with sla (paired -0.002 +- 0.005, 256 prompts). The
Ada/Blackwell targets keep sagesla (unmeasured there). Loading order (`load_transformer`):
read and validate the manifest -> check that this device can run the target (a refusal names the
bundle to use instead) -> sha256 of every file against the manifest (in a thread, while the model is
built on the meta device; a file recorded as checked in its current state is not hashed again,
`turbo_infer.verified`) -> read the safetensors straight onto the device (`turbo_infer.fastload`:
mapped on the CPU, pinned staged reads on a GPU) -> assign. No tensor is read from the weights file
before its hash has been checked.

This module is the runtime half of the adapter pair; it imports nothing from turbo_train.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from turbo_kernels.capability import Capabilities, kernel_support
from turbo_infer.layers.attention import SPARSE_BACKENDS
from turbo_infer.quant import PRECISIONS, W8A8Linear, fuse_gelu_ffns
from turbo_infer.models.token_order import check_token_tile

FORMAT = "turbo-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "transformer.safetensors"
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("sdpa", "sla", "sage", "sagesla")
SLA_OPTIONS = ("topk", "block_q", "block_k", "feature_map", "token_tile")  # token_tile optional (raster order)
TEXT_ENCODERS = ("minilm", "umt5")
VAES = ("toy_codec", "wan_vae")
WORLDS = ("toy", "wan")


class BundleError(ValueError):
    """A bundle that cannot be used: bad manifest, damaged file, missing tensor."""


class BundleIntegrityError(BundleError):
    """A file whose size or sha256 differs from the manifest (tampered, truncated, corrupted)."""


class BundleTargetError(BundleError):
    """This device cannot run the bundle's target."""


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One hardware target: what its bundles contain and what a device needs to run them."""

    name: str
    linear: str | None  # 8-bit format of the W8A8 linears ("fp8" | "int8"); None = floating point only
    sparse_attention: str  # backend for a model fine-tuned with SLA (it has proj_l)
    dense_attention: str  # backend for a dense-attention model
    dtype: str  # storage and compute dtype of the floating-point tensors
    min_compute_capability: tuple[int, int] | None  # None = no GPU needed
    hardware: str  # what the name stands for, for messages

    def needs(self, attention: str) -> list[str]:
        """The Capabilities flags a device must have to run this target's kernels natively."""
        need = {"fp8": ["fp8_gemm"], "int8": ["int8_gemm"], None: []}[self.linear]
        return need + (["int8_attention"] if attention in ("sage", "sagesla") else [])


TARGETS: dict[str, Target] = {
    "h100": Target("h100", "fp8", "sla", "sage", "bfloat16", (9, 0), "NVIDIA H100/H200 (Hopper)"),
    "a100": Target("a100", "int8", "sla", "sdpa", "bfloat16", (8, 0), "NVIDIA A100 (Ampere)"),
    "rtx4090": Target("rtx4090", "int8", "sagesla", "sage", "bfloat16", (8, 9), "NVIDIA RTX 4090 (Ada)"),
    "rtx5090": Target("rtx5090", "int8", "sagesla", "sage", "bfloat16", (12, 0), "NVIDIA RTX 5090 (Blackwell)"),
    "cpu": Target("cpu", None, "sla", "sdpa", "float32", None, "any CPU (torch reference kernels)"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aehior" else "a"  # as spoken: "an h100", "an a100", "an rtx4090", "a cpu"


def _cc(cc) -> str:
    return f"{cc[0]}.{cc[1]}"


def device_problem(target: Target, attention: str, cap: Capabilities) -> str | None:
    """Why a device with capabilities `cap` cannot run `target` natively (None: it can)."""
    if target.min_compute_capability is None:
        return None
    a = f"{_article(target.name)} {target.name} bundle"
    if cap.compute_capability is None:
        return (f"this {cap.device_type.upper()} cannot run {a} (it needs a CUDA GPU of compute capability >= "
                f"{_cc(target.min_compute_capability)}, {target.hardware})")
    if tuple(cap.compute_capability) < target.min_compute_capability:
        return (f"this GPU (compute capability {_cc(cap.compute_capability)}) cannot run {a} (it needs compute "
                f"capability >= {_cc(target.min_compute_capability)}, {target.hardware})")
    missing = [n for n in target.needs(attention) if not getattr(cap, n)]
    if missing:
        return (f"this GPU (compute capability {_cc(cap.compute_capability)}) cannot run {a}: no "
                f"{', '.join(missing)} kernels here (Triton missing?)")
    return None


def suggest_target(cap: Capabilities) -> str:
    """The most specific target this device runs natively (the GPU target of highest compute
    capability it satisfies, else cpu)."""
    ok = [t for t in TARGETS.values() if t.min_compute_capability is not None
          and device_problem(t, t.sparse_attention, cap) is None]
    return max(ok, key=lambda t: t.min_compute_capability).name if ok else "cpu"


def check_device(manifest: dict, device, allow_reference: bool = False) -> None:
    """Raise BundleTargetError unless `device` can run the bundle's target. allow_reference=True
    accepts any device: kernels it lacks run as the torch references (same math, slow)."""
    target = TARGETS[manifest["target"]]
    cap = kernel_support(torch.device(device))
    problem = device_problem(target, manifest["attention"]["backend"], cap)
    if problem is None or allow_reference:
        return
    use = suggest_target(cap)
    raise BundleTargetError(
        f"{problem}; export or use the {use} bundle instead (turbo-export --target {use}), or allow the torch "
        f"reference kernels explicitly (allow_reference=True / turbo-infer --allow-reference; slow)")


# ----------------------------------------------------------------------------- manifest schema


def _fail(source, field: str, message: str):
    raise BundleError(f"{source}: field {field!r}: {message}")


def _need(d: dict, key: str, types, source, prefix: str = ""):
    field = f"{prefix}{key}"
    if not isinstance(d, dict) or key not in d:
        _fail(source, field, "missing")
    v = d[key]
    if types is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types))):
        names = " or ".join(t.__name__ for t in _tuple(types))
        _fail(source, field, f"must be {names}, got {v!r}")
    return v


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _check_sha256(v, source, field):
    if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        _fail(source, field, f"must be a 64-digit lowercase hex sha256, got {v!r}")


def validate_manifest(m, source="manifest.json") -> dict:
    """Check a manifest's schema; raise BundleError naming the field. Returns m."""
    from turbo_infer.models.wan import WanConfig

    if not isinstance(m, dict):
        raise BundleError(f"{source}: must be a JSON object, got {type(m).__name__}")
    if _need(m, "format", str, source) != FORMAT:
        _fail(source, "format", f"must be {FORMAT!r}, got {m['format']!r}")
    version = _need(m, "format_version", int, source)
    if version != FORMAT_VERSION:
        _fail(source, "format_version", f"this runtime reads version {FORMAT_VERSION}, got {version} (re-export "
                                        f"the bundle with this version's turbo-export)")
    target = _need(m, "target", str, source)
    if target not in TARGETS:
        _fail(source, "target", f"must be one of {sorted(TARGETS)}, got {target!r}")
    mcc = _need(m, "min_compute_capability", (list, type(None)), source)
    if mcc is not None and (len(mcc) != 2 or not all(isinstance(c, int) for c in mcc)):
        _fail(source, "min_compute_capability", f"must be [major, minor] or null, got {mcc!r}")
    want = TARGETS[target].min_compute_capability
    if (None if mcc is None else tuple(mcc)) != want:
        _fail(source, "min_compute_capability", f"target {target} needs {None if want is None else list(want)}, "
                                                f"got {mcc!r}")
    if _need(m, "dtype", str, source) not in DTYPES:
        _fail(source, "dtype", f"must be one of {list(DTYPES)}, got {m['dtype']!r}")
    world = _need(m, "world", str, source)
    if world not in WORLDS:
        _fail(source, "world", f"must be one of {list(WORLDS)}, got {world!r}")

    model = _need(m, "model", dict, source)
    if _need(model, "arch", str, source, "model.") != "wan":
        _fail(source, "model.arch", f"must be 'wan', got {model['arch']!r}")
    config = _need(model, "config", dict, source, "model.")
    for k in ("attention", "attention_options"):
        if k in config:
            _fail(source, f"model.config.{k}", "belongs in the manifest's 'attention' section")
    try:
        WanConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        _fail(source, "model.config", str(e))

    att = _need(m, "attention", dict, source)
    backend = _need(att, "backend", str, source, "attention.")
    if backend not in ATTENTION_BACKENDS:
        _fail(source, "attention.backend", f"must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
    extra = set(att) - {"backend", *SLA_OPTIONS}
    if extra:
        _fail(source, f"attention.{sorted(extra)[0]}", f"unknown key; allowed: {['backend', *SLA_OPTIONS]}")
    if backend in SPARSE_BACKENDS:
        topk = _need(att, "topk", (int, float), source, "attention.")
        if not 0.0 < topk <= 1.0:
            _fail(source, "attention.topk", f"must be in (0, 1], got {topk}")
        for k in ("block_q", "block_k"):
            b = _need(att, k, int, source, "attention.")
            if b < 16 or b & (b - 1):
                _fail(source, f"attention.{k}", f"must be a power of two >= 16, got {b}")
        _need(att, "feature_map", str, source, "attention.")
        if att.get("token_tile") is not None:
            try:
                check_token_tile(att["token_tile"])
            except ValueError as e:
                _fail(source, "attention.token_tile", str(e).removeprefix("token_tile "))
    elif set(att) != {"backend"}:
        _fail(source, f"attention.{sorted(set(att) - {'backend'})[0]}", f"not used by the {backend!r} backend")

    linears = _need(m, "linears", dict, source)
    for name, entry in linears.items():
        prec = _need(entry, "precision", str, source, f"linears.{name}.")
        if prec not in PRECISIONS:
            _fail(source, f"linears.{name}.precision", f"must be one of {list(PRECISIONS)}, got {prec!r}")
        scale = _need(entry, "act_scale", (int, float, type(None)), source, f"linears.{name}.")
        if scale is not None and not (scale > 0 and math.isfinite(scale)):
            _fail(source, f"linears.{name}.act_scale", f"must be null (dynamic) or a finite number > 0, got {scale}")
        if prec != "bf16" and prec != TARGETS[target].linear:
            _fail(source, f"linears.{name}.precision", f"{prec!r} is not a format of target {target} "
                                                       f"(allowed: bf16, {TARGETS[target].linear})")

    from turbo_infer.samplers import SAMPLERS

    sampler = _need(m, "sampler", dict, source)
    if _need(sampler, "name", str, source, "sampler.") not in SAMPLERS:
        _fail(source, "sampler.name", f"must be one of {sorted(SAMPLERS)}, got {sampler['name']!r}")
    steps = _need(sampler, "steps", int, source, "sampler.")
    if steps < 1:
        _fail(source, "sampler.steps", f"must be >= 1, got {steps}")
    ts = _need(sampler, "timesteps", list, source, "sampler.")
    if len(ts) != steps + 1 or not all(isinstance(t, (int, float)) for t in ts):
        _fail(source, "sampler.timesteps", f"must be {steps + 1} numbers (steps + 1), got {ts!r}")
    if sampler["name"] == "rcm":  # the runtime samples the recorded grid
        from turbo_infer.samplers import mid_times_from_timesteps

        try:
            mid_times_from_timesteps(ts)
        except ValueError as e:
            _fail(source, "sampler.timesteps", str(e))
    for k in ("guidance", "shift"):
        _need(sampler, k, (int, float), source, "sampler.")
    video = _need(m, "video", dict, source)
    for k in ("num_frames", "height", "width", "fps"):
        v = _need(video, k, (int, float) if k == "fps" else int, source, "video.")
        if v <= 0:
            _fail(source, f"video.{k}", f"must be > 0, got {v}")

    te = _need(m, "text_encoder", dict, source)
    if _need(te, "name", str, source, "text_encoder.") not in TEXT_ENCODERS:
        _fail(source, "text_encoder.name", f"must be one of {list(TEXT_ENCODERS)}, got {te['name']!r}")
    _need(te, "path", (str, type(None)), source, "text_encoder.")
    vae = _need(m, "vae", dict, source)
    if _need(vae, "name", str, source, "vae.") not in VAES:
        _fail(source, "vae.name", f"must be one of {list(VAES)}, got {vae['name']!r}")
    _need(vae, "path", (str, type(None)), source, "vae.")

    sources = _need(m, "sources", dict, source)
    ck = _need(sources, "checkpoint", dict, source, "sources.")
    for fname, h in _need(ck, "sha256", dict, source, "sources.checkpoint.").items():
        _check_sha256(h, source, f"sources.checkpoint.sha256.{fname}")

    files = _need(m, "files", dict, source)
    if WEIGHTS not in files:
        _fail(source, f"files.{WEIGHTS}", "missing")
    for fname, entry in files.items():
        if "/" in fname or "\\" in fname or fname in ("", ".", "..", MANIFEST):
            _fail(source, f"files.{fname}", "must be a plain file name inside the bundle (not the manifest)")
        _check_sha256(_need(entry, "sha256", str, source, f"files.{fname}."), source, f"files.{fname}.sha256")
        if _need(entry, "bytes", int, source, f"files.{fname}.") < 0:
            _fail(source, f"files.{fname}.bytes", "must be >= 0")
    return m


def read_manifest(path) -> dict:
    """The validated manifest of the bundle directory `path`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bundle not found: {path}")
    if not path.is_dir():
        raise BundleError(f"{path}: a bundle is a directory (with {MANIFEST} and {WEIGHTS})")
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{mf}: missing; {path} is not a bundle (write one with turbo-export)")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from None
    return validate_manifest(m, mf)


# ----------------------------------------------------------------------------- integrity


def sha256_file(path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_sha256(path) -> dict[str, str]:
    """{file name: sha256} of a checkpoint: one file, or the weight and config files of a directory
    (or of a sharded index's directory)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".pt", ".pth", ".json"))
    elif path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        files = [path] + [path.parent / s for s in sorted(set(index.get("weight_map", {}).values()))]
    else:
        files = [path]
    return {f.name: sha256_file(f) for f in files}


VERIFY_MODES = ("cached", "full", "off")


def verify_mode(verify) -> str:
    """from_bundle's `verify` as one of VERIFY_MODES: True = "cached", False = "off"."""
    mode = ("cached" if verify else "off") if isinstance(verify, bool) else verify
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be True, False or one of {VERIFY_MODES}, got {verify!r}")
    return mode


def verify_files(path, manifest: dict, progress: bool = False, cached: bool = False) -> int:
    """Check every file the manifest lists: present, its size, its sha256. Raises
    BundleIntegrityError naming the first bad file. cached: skip the hashing of a file that
    `turbo_infer.verified` records as matching this digest in its current state (same inode, size,
    mtime and ctime), and record the files hashed here. Returns how many files were hashed."""
    from tqdm.auto import tqdm

    from turbo_infer.verified import VerifiedFiles, file_state

    path = Path(path)
    record = VerifiedFiles() if cached else None
    hashed = 0
    for name, entry in tqdm(sorted(manifest["files"].items()), desc="verify sha256", disable=not progress):
        f = path / name
        if not f.is_file():
            raise BundleIntegrityError(f"{f}: listed in {MANIFEST} but missing; re-export the bundle")
        size = f.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "grown"
            raise BundleIntegrityError(f"{f}: {size} bytes, {MANIFEST} says {entry['bytes']} (the file is {what} "
                                       f"or was replaced); re-export the bundle")
        if record is not None and record.known(f, entry["sha256"]):
            continue
        state = file_state(f)
        digest = sha256_file(f)
        hashed += 1
        if digest != entry["sha256"]:
            raise BundleIntegrityError(f"{f}: sha256 {digest[:16]}... does not match {MANIFEST} "
                                       f"({entry['sha256'][:16]}...): the file was modified or corrupted; "
                                       f"re-export the bundle")
        if record is not None:
            record.add(f, digest, state)
    if record is not None:
        record.save()
    return hashed


# ----------------------------------------------------------------------------- tensors


def keeps_stored_dtype(key: str, quantized: set[str]) -> bool:
    """Tensors never cast to the bundle dtype: W8A8 layers' buffers (int8/fp8 weights, fp32 scales
    and biases) and SLA's proj_l (fp32 by design)."""
    return key.rpartition(".")[0] in quantized or ".proj_l." in key


def cast_floats(state: dict, dtype: torch.dtype, quantized: set[str]) -> dict:
    """`state` with every floating-point tensor in `dtype`, except those `keeps_stored_dtype` names."""
    return {k: v.to(dtype) if v.is_floating_point() and not keeps_stored_dtype(k, quantized) else v
            for k, v in state.items()}


def model_config(manifest: dict):
    """The WanConfig the bundle describes (its attention section folded in)."""
    from turbo_infer.models.wan import WanConfig

    att = dict(manifest["attention"])
    backend = att.pop("backend")
    return WanConfig.from_dict({**manifest["model"]["config"], "attention": backend, "attention_options": att})


def build_transformer(manifest: dict, device="meta") -> nn.Module:
    """The bundle's WanModel with W8A8Linear swapped in per the manifest (and each feed-forward block
    whose two linears are W8A8 run as one W8A8GeluFFN op), tensors on `device` (default meta:
    uninitialised, to be filled by `load_state_dict(..., assign=True)`)."""
    from turbo_infer.models.wan import WanModel

    with torch.device(device):
        model = WanModel(model_config(manifest))
    modules = dict(model.named_modules())
    for name, entry in manifest["linears"].items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise BundleError(f"{MANIFEST}: field 'linears.{name}': the model has no Linear of that name")
        if entry["precision"] == "bf16":
            continue
        q = W8A8Linear(lin.in_features, lin.out_features, mode=entry["precision"], bias=lin.bias is not None,
                       act_scale=entry["act_scale"], device=device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    fuse_gelu_ffns(model)  # W8A8 feed-forward blocks as one op (same state-dict keys)
    model.fuse_norm_quant()  # and each normalized input quantized once for its W8A8 consumers
    return model


def read_weights(file, device) -> dict:
    """All tensors of a safetensors file on `device`: mapped on the CPU, read through pinned staging
    buffers onto a GPU (`turbo_infer.fastload`)."""
    from turbo_infer.fastload import load_safetensors

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        return load_safetensors(file, device)
    except Exception as e:  # ValueError / SafetensorError: truncated header or data, not a safetensors file
        raise BundleError(f"{file}: cannot read the safetensors file ({e}); the bundle is damaged, "
                          f"re-export it") from None


def load_transformer(path, device=None, *, dtype: torch.dtype | None = None, allow_reference: bool = False,
                     verify: bool = True, progress: bool = False, timings: dict | None = None):
    """Load a bundle's DiT onto `device` -> (model in eval mode, manifest).

    device: None = cuda if available, else cpu. dtype: compute dtype of the floating-point
    tensors (None = the bundle's). allow_reference: run on a device the target does not support,
    through the torch reference kernels. verify: check every file's size and sha256 first: True /
    "cached" (default) hashes only files that `turbo_infer.verified` does not record as checked in
    their current state, "full" hashes every file, False / "off" skips the check (only for a bundle
    verified moments ago). progress: tqdm bar over the hashing.
    timings: a dict that gets the seconds of the hashing (verify_s; it runs in a thread while the
    model's structure is built), how many files it hashed (verify_files_hashed) and the seconds of
    building and reading the DiT (dit_s, from the start).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(path)
    timings = {} if timings is None else timings
    manifest = read_manifest(path)  # 1. schema
    check_device(manifest, device, allow_reference)  # 2. can this device run the target?
    start = time.perf_counter()
    hashing = None
    mode = verify_mode(verify)
    if mode != "off":  # 3. every file's size and sha256 (in a thread: hashlib runs without the GIL) ...
        from turbo_infer.background import Background

        hashing = Background("sha256", lambda: verify_files(path, manifest, progress, cached=mode == "cached"))
    model = build_transformer(manifest)  # 4. ... while the structure is built on the meta device
    if hashing is not None:
        timings["verify_files_hashed"] = hashing.result()  # raises BundleIntegrityError before any tensor is read
        timings["verify_s"] = hashing.seconds
    else:
        timings["verify_s"] = 0.0
    state = read_weights(path / WEIGHTS, device)  # 5. tensors straight onto the device
    quantized = {n for n, e in manifest["linears"].items() if e["precision"] != "bf16"}
    state = cast_floats(state, dtype or getattr(torch, manifest["dtype"]), quantized)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise BundleError(f"{path / WEIGHTS}: tensors do not match {MANIFEST} ({e})") from None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:  # pragma: no cover - load_state_dict(strict=True) reports these first
            raise BundleError(f"{path / WEIGHTS}: no tensor for {name!r}")
    model = model.requires_grad_(False).eval()
    if device.type == "cuda":
        # the casts above are done (the staged copies were waited for by the read); only this stream:
        # a device-wide sync would also wait for the umT5 prefetch's copies on their own streams
        torch.cuda.current_stream(device).synchronize()
    timings["dit_s"] = time.perf_counter() - start
    return model, manifest


# ----------------------------------------------------------------------------- text encoder, VAE


def prefetch_text_weights(manifest: dict, device, path=None):
    """Start reading the referenced umT5 encoder's weight files onto a CUDA `device` in a background
    thread (`turbo_infer.background.Background`; the staged reads spend their time in file reads and
    copies that release the GIL, so they overlap the DiT's hashing and loading): pass it to
    `build_text_encoder(..., prefetched=)`. None where there is nothing to prefetch (not umT5, not
    CUDA, no path, not safetensors); a bad path is left to `build_text_encoder` to report."""
    te = manifest["text_encoder"]
    path = path if path is not None else te["path"]
    if te["name"] != "umt5" or torch.device(device).type != "cuda" or path is None:
        return None
    from turbo_infer.text_encoders import umt5_weight_files

    try:
        files = umt5_weight_files(path)
    except OSError:
        return None
    if not files:
        return None
    from turbo_infer.background import Background
    from turbo_infer.fastload import read_files

    return Background("umT5 weights", lambda: read_files(files, device))


def build_text_encoder(manifest: dict, device, path=None, prefetched=None):
    """The text encoder the manifest references (`path` overrides its stored path); prefetched: a
    `prefetch_text_weights` read of its weights."""
    te = manifest["text_encoder"]
    path = path if path is not None else te["path"]
    if te["name"] == "minilm":
        from turbo_infer.text_encoders import MiniLMTextEncoder

        return MiniLMTextEncoder(device=device, dtype=torch.float32, path=path)
    from turbo_infer.text_encoders import UMT5TextEncoder

    if path is None:
        raise BundleError(f"{MANIFEST}: field 'text_encoder.path' is null: pass the umT5 directory "
                          f"(text_encoder_path= / turbo-infer --text-encoder)")
    return UMT5TextEncoder(path, device=device, dtype=getattr(torch, manifest["dtype"]), prefetched=prefetched)


def build_vae(manifest: dict, device, path=None, dtype=torch.float32):
    """The VAE the manifest references (`path` overrides its stored path); a Wan VAE runs in `dtype`
    (fp32 by default, as the Wan pipeline; bf16 decodes 1.58x faster on an H200, BENCHMARKS.md)."""
    vae = manifest["vae"]
    if vae["name"] == "toy_codec":
        from turbo_infer.vae import ToyCodec

        return ToyCodec()
    path = path if path is not None else vae["path"]
    if path is None:
        raise BundleError(f"{MANIFEST}: field 'vae.path' is null: pass the Wan VAE directory "
                          f"(vae_path= / turbo-infer --vae)")
    from turbo_infer.vae import WanVAE

    return WanVAE(path, device=device, dtype=dtype)


__all__ = ["BundleError", "BundleIntegrityError", "BundleTargetError", "FORMAT", "FORMAT_VERSION", "MANIFEST",
           "TARGETS", "Target", "VERIFY_MODES", "WEIGHTS", "build_text_encoder", "build_transformer", "build_vae", "cast_floats",
           "check_device", "checkpoint_sha256", "device_problem", "load_transformer", "model_config",
           "prefetch_text_weights", "read_manifest",
           "read_weights",
           "sha256_file", "suggest_target", "validate_manifest", "verify_files", "verify_mode"]
