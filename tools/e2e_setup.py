"""Random-weight models at the real Wan2.1 configs for tools/bench_e2e.py, and their files.

    SHAPES["real"]   Wan2.1-1.3B DiT at 480p x 81 frames (latent 21 x 60 x 104, 32 760 tokens),
                     umT5-XXL encoder on 512 tokens, Wan2.1 VAE (diffusers AutoencoderKLWan defaults),
                     and the optional 14B DiT at 720p (latent 21 x 90 x 160, 75 600 tokens)
    SHAPES["tiny"]   the same code path on a CPU in seconds (tests/infer/test_bench_e2e.py)

Nothing here is trained: weights are random (speed only). The umT5 tokenizer is synthetic: a
unigram model with umT5's vocabulary size (256 384 pieces, like the real tokenizer.json in size),
so that loading and running it cost about what the real one does; its token ids mean nothing.
"""
from __future__ import annotations

import itertools
import math
import string
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting, shallow depth of field"

# google/umt5-xxl's encoder, as Wan2.1 uses it (models_t5_umt5-xxl-enc-bf16.pth)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                num_heads=64, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, tie_word_embeddings=False, scalable_attention=True,
                layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
UMT5_TINY = dict(UMT5_XXL, vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                 num_heads=4, relative_attention_num_buckets=8)
# AutoencoderKLWan() defaults are Wan2.1's VAE (base_dim 96, z_dim 16, x8 space, x4 time)
VAE_WAN21: dict = {}
VAE_TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])


@dataclass(frozen=True)
class Shape:
    """Sizes of one benchmark world: the DiT config, the video, the text length, the umT5 and VAE
    configs, and the optional big DiT with its own video size."""

    dit: str | object  # WAN_CONFIGS name or a WanConfig
    frames: int
    height: int
    width: int
    text_len: int
    umt5: dict
    vae: dict
    big: str | object  # the "14B 720p" DiT
    big_frames: int
    big_height: int
    big_width: int

    def dit_config(self, big: bool = False):
        from turbo_infer.models.wan import get_config

        return get_config(self.big if big else self.dit)


def _tiny_dit(layers: int):
    from turbo_infer.models.wan import WanConfig

    return WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=layers, text_dim=UMT5_TINY["d_model"])


SHAPES = {
    "real": Shape("wan2.1-1.3b", 81, 480, 832, 512, UMT5_XXL, VAE_WAN21, "wan2.1-14b", 81, 720, 1280),
    "tiny": Shape(_tiny_dit(2), 5, 64, 64, 16, UMT5_TINY, VAE_TINY, _tiny_dit(1), 5, 64, 96),
}


# ----------------------------------------------------------------------------- random models


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (no fp32 copy of a 14B model first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_dit(cfg, device, dtype, seed: int = 0, std: float = 0.02):
    """WanModel(cfg) on `device` in `dtype`, every tensor N(0, std^2) (tools/bench_dit.py's init:
    the head is not left at zero, SLA's proj_l stays fp32), eval, no grad."""
    from turbo_infer.models.wan import WanModel

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = WanModel(cfg)
    for p in model.parameters():
        p.data.normal_(std=std)
    return model.eval().requires_grad_(False)


def random_umt5(config: dict, device, dtype):
    """UMT5EncoderModel at `config` with transformers' own random init, built on `device` in `dtype`
    (on a GPU the 5.7B-parameter init takes well under a second; no CPU copy)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(1)
    with torch.device(device):
        model = UMT5EncoderModel._from_config(UMT5Config(**config), dtype=dtype)
    return model.eval().requires_grad_(False)


def synthetic_vocab(size: int) -> list[tuple[str, float]]:
    """`size` unigram pieces: <pad>, </s>, <unk>, single characters with and without the word
    marker, then letter strings of growing length; scores fall with rank."""
    if size < 200:
        raise ValueError(f"vocab size must be >= 200 (characters first), got {size}")
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += list(chars) + ["\u2581" + c for c in chars]
    n = 2
    while len(pieces) < size:
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            word = "".join(letters)
            pieces += ["\u2581" + word, word]
            if len(pieces) >= size:
                break
        n += 1
    return [(p, 0.0 if i < 3 else -math.log(i)) for i, p in enumerate(pieces[:size])]


def synthetic_umt5_tokenizer(vocab_size: int):
    """A T5Tokenizer (unigram, appends </s>) over `synthetic_vocab(vocab_size)`."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=synthetic_vocab(vocab_size), extra_ids=0)


def in_memory_umt5_encoder(model, tokenizer, device, dtype, max_length: int):
    """The project's UMT5TextEncoder (tokenize, encode with the mask, zero the padding) around a
    model already in memory: UMT5TextEncoder.__init__ only adds reading both from a directory. A
    transformers UMT5EncoderModel is re-housed in the runtime's own module (turbo_infer.models.umt5,
    what UMT5TextEncoder builds from a directory), sharing its tensors. No embedding cache, so that
    every encode() runs the model."""
    from dataclasses import fields

    from turbo_infer.models.umt5 import UMT5Config, UMT5Encoder
    from turbo_infer.text_encoders import WAN_NEGATIVE_PROMPT, UMT5TextEncoder, _HFTextEncoder

    if not isinstance(model, UMT5Encoder):
        config = UMT5Config(**{f.name: getattr(model.config, f.name) for f in fields(UMT5Config)})
        model = UMT5Encoder.from_state(config, model.state_dict(), "in-memory umT5")
    enc = UMT5TextEncoder.__new__(UMT5TextEncoder)
    enc.native = True
    _HFTextEncoder.__init__(enc, model, tokenizer, device=device, dtype=dtype, max_length=max_length,
                            negative_prompt=WAN_NEGATIVE_PROMPT, cache_size=0, cache_dir=None,
                            namespace="umt5|random-in-memory")
    return enc


@torch.no_grad()
def static_scales(model, forward) -> dict:
    """A stand-in for calibration on random weights: one `forward()` records the input amax of every
    W8A8Linear of the DiT (probe hooks: the runtime's fused paths step aside for hooked layers,
    `turbo_infer.quant.has_data_hooks`). Returns {name: the static per-tensor scale amax / QMAX} (what a calibrated
    bundle carries); the model keeps its own scales."""
    from turbo_infer.quant import W8A8Linear
    from turbo_kernels.gemm.quantize import QMAX

    layers = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    amax = dict.fromkeys(layers)

    def hook(name):
        def record(mod, args):
            x = args[0]
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: the probe got {type(x).__name__}, not the input tensor (a fused path "
                                "skipped the hooked layer)")
            amax[name] = max(amax[name] or 0.0, float(x.detach().abs().max()))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n, a in amax.items() if a is None]
    if unseen:
        raise RuntimeError(f"no input reached {len(unseen)} W8A8 layers during the forward: {unseen[:5]}")
    return {n: max(amax[n], 1e-6) / QMAX[m.mode] for n, m in layers.items()}


def apply_scales(model, scales: dict) -> dict:
    """Give each named W8A8Linear the activation scale of `scales` (None: dynamic); returns {name: the previous
    act_scale} for `restore_scales`."""
    old = {}
    for n, s in scales.items():
        m = model.get_submodule(n)
        old[n], m.act_scale = m.act_scale, s
    return old


def set_static_scales(model, forward) -> dict:
    """`static_scales` of one `forward()`, applied (`apply_scales`); returns the previous scales."""
    return apply_scales(model, static_scales(model, forward))


def restore_scales(model, old: dict) -> None:
    """Undo `apply_scales` / `set_static_scales`."""
    apply_scales(model, old)


def standin_plan(model, scales: dict, fmt: str = "fp8") -> dict:
    """A calibration plan for a random-weight DiT, the `--plan` of a bundle with static activation scales: every
    layer of `scales` ({name: static scale}, `static_scales`) in `fmt` with that scale, activations static. Nothing
    is measured on random weights: sensitivities read 0 (every layer within the budgets) and `calibration.stand_in`
    says where the scales came from. Passes `calibrate.validate_plan`."""
    from turbo_train.methods.calibrate import PLAN_FORMAT, PLAN_VERSION, validate_plan

    cfg = model.config.to_dict()
    mods = dict(model.named_modules())
    plan = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION,
        "model": {"config": {k: v for k, v in cfg.items() if k not in ("attention", "attention_options")},
                  "attention": cfg["attention"], "checkpoint": None, "checkpoint_sha256": {}},
        "calibration": {"stand_in": "random weights: static scales = input amax / QMAX over one sampler run "
                                    "(tools/e2e_setup.static_scales), sensitivities not measured"},
        "activations": "static", "error_budget": 1e-3, "layer_error_budget": 2e-2, "formats": [fmt],
        "summary": {}, "float_layers": [],
        "layers": {n: {"precision": fmt, "in_features": mods[n].in_features, "out_features": mods[n].out_features,
                       "act_scale": {fmt: float(s)}, "sensitivity": {fmt: 0.0}, "layer_error": {fmt: 0.0}}
                   for n, s in scales.items()},
    }
    return validate_plan(plan, "the stand-in plan")


def random_wan_vae(config: dict, device):
    """diffusers AutoencoderKLWan(**config) on `device`, fp32, PyTorch's default random init."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    with torch.device(device):
        vae = AutoencoderKLWan(**config)
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- stand-ins


class RandomContext:
    """Text-encoder stand-in for --skip-text: N(0, 1) states (B, length, dim), no model."""

    def __init__(self, dim: int, length: int, device, dtype):
        self.dim, self.length, self.device, self.dtype = dim, length, torch.device(device), dtype

    def encode(self, prompts) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(prompts), self.length, self.dim, generator=g).to(self.device, self.dtype)

    def empty_embedding(self) -> torch.Tensor:
        return self.encode([""])


class LatentOnlyVAE:
    """VAE stand-in for --skip-vae: Wan2.1's latent geometry (16 channels, x8 space, x4 time);
    it cannot decode."""

    latent_channels, spatial_factor, temporal_factor = 16, 8, 4

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (16, (num_frames - 1) // 4 + 1, height // 8, width // 8)

    def decode(self, latents):
        raise RuntimeError("--skip-vae: there is no VAE to decode with")


# ----------------------------------------------------------------------------- files


def video_sink():
    """(sink for `turbo_infer.video_io.write_mp4_stream`, its name): None = H.264 through imageio-ffmpeg; where
    imageio-ffmpeg or its ffmpeg is missing (the GPU image has neither, and its wheel is 68 MB), OpenCV's
    mp4v writer."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return OpenCVSink, "opencv mp4v (imageio-ffmpeg unavailable)"
    return None, "imageio-ffmpeg H.264"


class OpenCVSink:
    """`write_mp4_stream` sink: OpenCV's mp4v writer (RGB frames in)."""

    def __init__(self, tmp: Path, width: int, height: int, fps: float):
        import cv2

        self.writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
        if not self.writer.isOpened():
            raise RuntimeError(f"OpenCV cannot open an mp4v writer for {tmp}")

    def write(self, frame) -> None:
        import numpy as np

        self.writer.write(np.ascontiguousarray(frame[..., ::-1]))  # RGB -> BGR

    def close(self) -> None:
        self.writer.release()


class FirstKernelCalls:
    """Context manager: the host seconds of each Triton kernel's first launch inside it ({kernel name: s},
    `seconds` their sum). A first launch finds the kernel's specialization in Triton's on-disk cache (or
    compiles it) and loads its module: the part of a fresh process's DiT warm-up that is not the forward
    itself. Later launches are not timed; outside the block nothing is patched."""

    def __init__(self):
        self.first: dict[str, float] = {}

    def __enter__(self):
        self._cls = None
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:  # no Triton: nothing to time
            return self
        if not callable(getattr(JITFunction, "run", None)):  # another Triton's launch path: not timed
            return self
        self._cls, self._run = JITFunction, JITFunction.run
        first, run = self.first, self._run

        def timed_run(fn, *args, **kwargs):
            name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")
            if name in first:
                return run(fn, *args, **kwargs)
            t = time.perf_counter()
            try:
                return run(fn, *args, **kwargs)
            finally:
                first[name] = time.perf_counter() - t

        JITFunction.run = timed_run
        return self

    def __exit__(self, *exc):
        if self._cls is not None:
            self._cls.run = self._run
        return False

    @property
    def seconds(self) -> float:
        return sum(self.first.values())


def warm_page_cache(paths, chunk: int = 64 << 20) -> int:
    """Read every file under `paths` once (discarding the bytes) so that a fresh process loads
    them from the page cache; returns the bytes read."""
    total = 0
    for root in paths:
        root = Path(root)
        for f in sorted([root] if root.is_file() else root.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while block := fh.read(chunk):
                        total += len(block)
    return total


def dir_bytes(path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


__all__ = ["FirstKernelCalls", "LatentOnlyVAE", "OpenCVSink", "PROMPT", "RandomContext", "SHAPES", "Shape", "UMT5_XXL", "default_dtype",
           "dir_bytes", "in_memory_umt5_encoder", "random_dit", "random_umt5", "random_wan_vae", "restore_scales",
           "set_static_scales", "standin_plan", "synthetic_umt5_tokenizer", "synthetic_vocab", "video_sink", "warm_page_cache"]
