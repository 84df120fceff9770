"""Wan2.1 text-to-video diffusion transformer (DiT), one implementation for every size.

Follows Wan2.1 (Wan team, "Wan: Open and Advanced Large-Scale Video Generative Models", 2025):
3D patch embedding → per block [adaLN-modulated self-attention with RMSNorm on q/k and 3D RoPE,
cross-attention to the text states, adaLN-modulated GELU(tanh) FFN] → modulated head.
Rectified-flow velocity model: given x_s = (1-s)·x0 + s·ε and timestep 1000·s it predicts v = ε - x0.
With `prediction="x0"` the network's head predicts the clean sample x̂0 and the forward returns the
velocity it implies, v = (x_s - x̂0) / max(s, 0.05) (Li & He, "Back to Basics: Let Denoising Generative
Models Denoise", 2025: when a token carries many pixel values, a network that must output the noise
leaves some of it in its samples, while clean data lie on a low-dimensional manifold it can hit).
Every caller (losses, samplers, rCM, SLA) keeps seeing a velocity model.

The parameter names follow the official Wan checkpoint layout (blocks.N.self_attn.q, ...);
`turbo_infer.models.wan_keys` converts from/to the diffusers `WanTransformer3DModel` layout.
Numerics match diffusers at fp32 (norms and modulation in fp32, sinusoid in fp32, RoPE angles in
fp64). Self-attention goes through a pluggable backend (`turbo_infer.layers.attention`), so SLA and
the low-bit kernels replace it per model; cross-attention always stays dense SDPA.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from turbo_infer.layers.attention import SPARSE_BACKENDS, make_attention
from turbo_infer.models.token_order import TOKEN_TILE, check_token_tile, inverse_permutation, tile_permutation
from turbo_infer.quant import has_data_hooks, norm_quantized_input


# ----------------------------------------------------------------------------- config

PREDICTIONS = ("velocity", "x0")
# x0-prediction divides by the flow time s; below this s the implied velocity is (x_s - x̂0) / X0_MIN_S
# (JiT's clip: the velocity of a nearly clean input is not worth an unbounded weight)
X0_MIN_S = 0.05


@dataclass(kw_only=True)
class WanConfig:
    """Architecture of a Wan2.1 T2V DiT. Sizes are channels unless stated."""

    dim: int  # model width (hidden size)
    ffn_dim: int  # FFN inner width
    num_heads: int  # attention heads; head_dim = dim // num_heads
    num_layers: int  # transformer blocks
    text_dim: int = 4096  # width of the text encoder states (umT5-XXL: 4096, toy MiniLM: 384)
    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # latent channels out
    freq_dim: int = 256  # sinusoidal timestep embedding width
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) patch in latent cells
    eps: float = 1e-6  # LayerNorm / RMSNorm epsilon
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention
    rope_theta: float = 10000.0
    attention: str = "sdpa"  # self-attention backend name (see turbo_infer.layers.attention)
    attention_options: dict = field(default_factory=dict)  # backend options, e.g. {"topk": 0.1}
    # what the head predicts: "velocity" (v = ε - x0, Wan) or "x0" (clean sample; forward still returns v)
    prediction: str = "velocity"
    # rows of a learned embedding of the latent frame index added to the patch tokens (0 = none, as Wan).
    # Not in Wan: its causal VAE already makes the input time-asymmetric. The toy codec does not, and a toy
    # DiT without it cannot tell a video from the same video played backwards (recipes/toy/README.md).
    frame_embed_len: int = 0
    # rows of two learned embeddings, of the token's latent row and of its column, added to the patch tokens
    # (0 = none, as Wan). Not in Wan. Added for teacher v6's flat first prediction (recipes/toy/README.md,
    # "Where the direction is lost"); since measured not to be needed there: v6 without them learns a
    # caption-dependent layout from pure noise as fast ("Can the teacher make its layout depend on the
    # caption?"). With frame_embed_len, the tokens know (frame, row, column) absolutely.
    space_embed_len: int = 0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"WanConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "in_channels", "out_channels", "freq_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"WanConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"WanConfig head_dim ({self.head_dim}) must be even and >= 6 for 3D RoPE")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints, got {self.patch_size}")
        if int(self.frame_embed_len) < 0:
            raise ValueError(f"WanConfig.frame_embed_len must be >= 0 (0 = no frame embedding), got {self.frame_embed_len}")
        if int(self.space_embed_len) < 0:
            raise ValueError(f"WanConfig.space_embed_len must be >= 0 (0 = no row/column embedding), got {self.space_embed_len}")
        if self.attention_options.get(TOKEN_TILE) is not None:  # the DiT's own option (token_order.py), kept as a list
            try:
                tile = check_token_tile(self.attention_options[TOKEN_TILE])
            except ValueError as e:
                raise ValueError(f"WanConfig.attention_options.{e}") from None
            self.attention_options = {**self.attention_options, TOKEN_TILE: list(tile)}

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown WanConfig keys: {sorted(unknown)}")
        return cls(**d)


# Size presets; also the CLI's `--config` choices.
WAN_CONFIGS: dict[str, WanConfig] = {
    # Toy world: MiniLM text (384), toy codec latents (48 ch = 3 RGB x 4 x 4 space-to-depth). 7.1M params.
    "toy": WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=6, text_dim=384, in_channels=48, out_channels=48),
    "wan2.1-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def get_config(name_or_config: "str | WanConfig | dict", **overrides) -> WanConfig:
    """Resolve a preset name, dict or WanConfig, applying `overrides` (e.g. attention="sla")."""
    if isinstance(name_or_config, WanConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = WanConfig.from_dict(name_or_config)
    elif name_or_config in WAN_CONFIGS:
        cfg = WAN_CONFIGS[name_or_config]
    else:
        raise ValueError(f"unknown Wan config {name_or_config!r}; choose one of {sorted(WAN_CONFIGS)}")
    return replace(cfg, **overrides) if overrides else replace(cfg)


# WanConfig fields that describe the trained network itself (as opposed to how it runs: the attention
# backend and its options); a checkpoint that stores its config keeps these (checkpoint_config).
NETWORK_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "in_channels", "out_channels", "freq_dim",
                  "patch_size", "eps", "cross_attn_norm", "rope_theta", "prediction", "frame_embed_len", "space_embed_len")
# learned absolute-position tables that start at zero: a checkpoint trained without one loads with it
# added (WanModel.from_pretrained, strict or not), its function unchanged until it trains
POSITION_TABLES = {"frame_embedding": "frame_embed_len", "row_embedding": "space_embed_len",
                   "col_embedding": "space_embed_len"}


def checkpoint_config(state: dict, file_config: "dict | None", path, config=None, **overrides) -> WanConfig:
    """The WanConfig of loaded weights: `config` (preset name / dict / WanConfig) if given, else the
    checkpoint's own `file_config`, else the preset its tensor shapes match; then `overrides`.
    The network is the weights', not the caller's preset's: when the checkpoint stores its config, its
    NETWORK_FIELDS (shape, patch size, RoPE base, what the head predicts) replace those of `config`, with
    a warning naming each that differed (e.g. a recipe's `toy` preset loading a teacher trained with
    another patch size); only `config`'s attention backend and options, and explicit `overrides`, apply."""
    from turbo_infer.models.wan_keys import infer_config

    cfg = get_config(config if config is not None else (file_config or infer_config(state, path)))
    if config is not None and file_config is not None:
        stored = get_config(file_config)
        changed = {f: getattr(stored, f) for f in NETWORK_FIELDS if getattr(stored, f) != getattr(cfg, f)}
        # a preset never names the prediction nor position tables (0 = none: the checkpoint's tables are an
        # addition, e.g. the shipped toy teacher's under the toy preset); an explicit override is the caller's choice
        shown = {f: v for f, v in changed.items() if f != "prediction" and f not in overrides
                 and not (f in POSITION_TABLES.values() and getattr(cfg, f) == 0)}
        if shown:
            warnings.warn(f"{path}: the checkpoint's network ({', '.join(f'{f}={v}' for f, v in shown.items())}) "
                          f"replaces the requested config's", stacklevel=3)
        cfg = replace(cfg, **changed)
    return replace(cfg, **overrides)


# ----------------------------------------------------------------------------- building blocks


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding [cos, sin] of t·10000^(-i/half), computed in fp32 as diffusers does.

    t: (B,) float timesteps in [0, 1000] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# Where RMSNorm (the cross-attention's q / k norms; self-attention's go through the fused norm + RoPE kernel) runs as
# one Triton pass (`compile_ops.rms_norm`) on CUDA in inference: "eager" (outside torch.compile; a compiled block
# leaves it to Inductor, which fuses the chain itself), "always" or "never". Eager, the torch chain (fp32 copy, pow,
# mean, rsqrt, two products, cast) makes ~7 passes over the (L, dim) tensor: on the 4-step Wan-1.3B DiT's profile
# ~80 ms per video of elementwise kernels on an H100 (BENCHMARKS.md, end to end). torch.compile guards on it.
FUSED_RMS_NORM = "eager"
# the placements FUSED_RMS_NORM and EPILOGUE_RESIDUALS take (`_placement_wanted`)
PLACEMENTS = ("eager", "always", "never")


def _placement_wanted(name: str, mode: str) -> bool:
    """Whether a fused path with placement `mode` (the module constant `name`) runs here: "always", "eager" outside
    torch.compile, "never" not; any other value is refused naming the constant."""
    if mode not in PLACEMENTS:
        raise ValueError(f"{name} must be one of {PLACEMENTS}, got {mode!r}")
    return mode == "always" or (mode == "eager" and not torch.compiler.is_compiling())


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (Wan normalizes q/k across all heads)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused_rms_norm(x):
            from turbo_infer.layers.compile_ops import rms_norm

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def layer_norm_fp32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm evaluated in fp32 (returns fp32), as Wan's FP32LayerNorm."""
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps)


class RoPE3D(nn.Module):
    """3D rotary embedding: head_dim split into (frames, height, width) parts of sizes
    (d - 4·(d//6), 2·(d//6), 2·(d//6)); consecutive channel pairs rotate by pos·θ^(-2i/part)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        hw = 2 * (head_dim // 6)
        self.parts = (head_dim - 2 * hw, hw, hw)
        self.theta = theta
        self._cache: dict = {}

    def freqs(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (L, head_dim/2) for a (F', H', W') token grid, L = F'·H'·W' (fp32)."""
        key = (grid, str(device))
        if key not in self._cache:
            angles = []
            for n, part in zip(grid, self.parts):
                inv = 1.0 / (self.theta ** (torch.arange(0, part, 2, dtype=torch.float64) / part))  # (part/2,)
                angles.append(torch.outer(torch.arange(n, dtype=torch.float64), inv))  # (n, part/2)
            f, h, w = grid
            a = torch.cat(
                [
                    angles[0][:, None, None].expand(f, h, w, -1),
                    angles[1][None, :, None].expand(f, h, w, -1),
                    angles[2][None, None, :].expand(f, h, w, -1),
                ],
                dim=-1,
            ).reshape(f * h * w, -1)  # (L, head_dim/2)
            self._cache[key] = (a.cos().float().to(device), a.sin().float().to(device))
        return self._cache[key]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, L, H, D) with cos/sin (L, D/2) -> rotated x, same dtype."""
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)  # (B, L, H, D)
        return out.to(x.dtype)


# ----------------------------------------------------------------------------- attention


def _fused_rms_norm(x: torch.Tensor) -> bool:
    """Whether RMSNorm takes the one-pass kernel for x (FUSED_RMS_NORM, CUDA inference, as fused_norm_rope_applies)."""
    return _placement_wanted("FUSED_RMS_NORM", FUSED_RMS_NORM) and fused_norm_rope_applies(x)


def fused_norm_rope_applies(t: torch.Tensor) -> bool:
    """Whether WanSelfAttention takes the fused RMSNorm + RoPE kernel for a q/k projection `t`: CUDA
    inference only. With autograd recording, or a forward-mode tangent attached (rCM's no-grad JVP pass),
    the eager path runs: the kernel has neither a backward nor a JVP rule."""
    return t.is_cuda and not torch.is_grad_enabled() and fwAD.unpack_dual(t).tangent is None


# where gated_residual hands the residual to a W8A8 layer's GEMM epilogue: "always" (the default since session 29),
# "eager" (in eager runs only; a compiled block keeps the formula, which Inductor fuses into one elementwise kernel)
# or "never". H100, 1.3B shape, one run: compiled 4-step DiT 0.772 s with the epilogue against 0.787 s with the
# fused formula (after an attention output projection 0.213 against 0.252 ms; eager the formula is unfused:
# 0.925 ms). (Before the gate was folded into the epilogue's scale vector, the epilogue lost when compiled:
# 0.793 against 0.776 s on an H200.) tools/bench_e2e.py times the other placement; torch.compile guards on it,
# so changing it recompiles.
EPILOGUE_RESIDUALS = "always"


def gated_residual(linear: nn.Module, h, residual: torch.Tensor | None, gate: torch.Tensor | None):
    """residual + gate[:, None]·linear(h) in the residual's dtype (gate (B, dim) fp32 or None), or linear(h)
    without a residual. In inference a layer with `forward_residual` (the W8A8 layers) adds it in its
    GEMM's epilogue, in fp32 and rounded once, so the product never round-trips through memory
    (EPILOGUE_RESIDUALS: eager and compiled runs by default); elsewhere (compiled blocks under "eager", "never",
    training, float layers, hooked layers such as calibration's probes) the block's own formula runs: the sum in fp32
    where there is a gate, in the residual's dtype where there is none (Wan's cross-attention residual)."""
    if residual is None:
        return linear(h)
    fused = getattr(linear, "forward_residual", None)
    wanted = _placement_wanted("EPILOGUE_RESIDUALS", EPILOGUE_RESIDUALS)
    if fused is not None and wanted and not torch.is_grad_enabled() and not has_data_hooks(linear):
        return fused(h, residual, gate)
    if gate is None:
        return residual + linear(h)
    return (residual.float() + linear(h).float() * gate[:, None]).to(residual.dtype)


class _Projections(nn.Module):
    """The q, k, v, o linears and the q/k RMSNorms (across heads) that both attentions of a block have."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)


def backend_options(options: dict) -> dict:
    """The attention options that the backend takes: all but the ones the DiT applies itself (token_tile)."""
    return {k: v for k, v in options.items() if k != TOKEN_TILE}


class WanSelfAttention(_Projections):
    """Self-attention with RMSNorm(q, k) across heads, 3D RoPE and a pluggable backend."""

    def __init__(self, cfg: WanConfig):
        super().__init__(cfg)
        self.attn = make_attention(cfg.attention, cfg.head_dim, **backend_options(cfg.attention_options))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, dim); with residual (B, L, dim): residual + gate·attention(x) (`gated_residual`)
        B, L, _ = x.shape
        q_lin, k_lin = self.q(x), self.k(x)  # (B, L, dim)
        if fused_norm_rope_applies(q_lin):  # one kernel per projection: turbo_kernels qk_norm_rope
            from turbo_infer.layers.compile_ops import norm_rope

            q = norm_rope(q_lin, self.norm_q.weight, *rope, self.num_heads, self.norm_q.eps)  # (B, L, H, D)
            k = norm_rope(k_lin, self.norm_k.weight, *rope, self.num_heads, self.norm_k.eps)
        else:
            q = RoPE3D.rotate(self.norm_q(q_lin).view(B, L, self.num_heads, self.head_dim), *rope)  # (B, L, H, D)
            k = RoPE3D.rotate(self.norm_k(k_lin).view(B, L, self.num_heads, self.head_dim), *rope)
        v = self.v(x).view(B, L, self.num_heads, self.head_dim)
        o = self.attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, D)
        return gated_residual(self.o, o.transpose(1, 2).reshape(B, L, -1), residual, gate)  # (B, L, dim)


class WanCrossAttention(_Projections):
    """Dense cross-attention from video tokens to text states (q/k RMSNorm, no RoPE)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, dim), context: (B, Lc, dim); with residual: residual + attention(x)
        B, L, _ = x.shape
        Lc = context.shape[1]
        q = self.norm_q(self.q(x)).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.norm_k(self.k(context)).view(B, Lc, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(B, Lc, self.num_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
        return gated_residual(self.o, o.transpose(1, 2).reshape(B, L, -1), residual, None)


# ----------------------------------------------------------------------------- block and model


def _modulation_init(n: int, dim: int) -> torch.Tensor:
    """(1, n, dim) ~ N(0, 1/dim). Built on the meta device (a model to be filled from a checkpoint) it is only
    the shape: arithmetic on meta tensors runs torch's Python refs, whose first use imports torch._dynamo
    (~1 s of a fresh process's start)."""
    t = torch.empty(1, n, dim)
    return t if t.is_meta else torch.randn(1, n, dim) / dim**0.5


class WanBlock(nn.Module):
    """One DiT block. Modulation e = modulation + time_proj(t) gives (shift, scale, gate) for the
    self-attention and for the FFN (6 vectors of size dim)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.cross_attn = WanCrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(_modulation_init(6, cfg.dim))

    def forward(self, x, e, context, rope):
        # x: (B, L, dim); e: (B, 6, dim) fp32; context: (B, Lc, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).unbind(1)  # each (B, dim)
        h = self._modulated_norm(x, self.norm1, shift1, scale1, (self.self_attn.q, self.self_attn.k, self.self_attn.v))
        x = self.self_attn(h, rope, residual=x, gate=gate1)  # x + gate1·attn(h), see gated_residual
        h = self._modulated_norm(x, self.norm3, None, None, (self.cross_attn.q,)) if self.norm3 is not None else x
        x = self.cross_attn(h, context, residual=x)
        h = self._modulated_norm(x, self.norm2, shift2, scale2, (self.ffn,))
        return gated_residual(self.ffn, h, x, gate2)

    # set by WanModel.fuse_norm_quant (bundles): hand W8A8 consumers their input quantized in one pass
    fused_norm_quant = False

    def _modulated_norm(self, x, norm, shift, scale, consumers):
        """LayerNorm(x)·(1 + scale) + shift (no modulation when scale is None) for the consumers (linears /
        the FFN): already quantized, in one fused pass, when the model opted in (bundles), in inference,
        and they are all W8A8 layers that would quantize it alike, without hooks (which expect the
        tensor; calibration's probes are such); else in x's dtype."""
        if self.fused_norm_quant and not torch.is_grad_enabled():
            q = norm_quantized_input(x, norm, shift, scale, list(consumers))
            if q is not None:
                return q
        y = layer_norm_fp32(x, norm)
        if scale is not None:
            y = y * (1 + scale[:, None]) + shift[:, None]
        return y.to(x.dtype)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(_modulation_init(2, cfg.dim))

    def forward(self, x, temb):
        # x: (B, L, dim), temb: (B, dim) fp32
        shift, scale = (self.modulation.float() + temb[:, None]).unbind(1)  # (B, dim) each
        h = (layer_norm_fp32(x, self.norm) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)
        return self.head(h)  # (B, L, C_out * pt * ph * pw)


def _attention_ops() -> tuple:
    """The aten fused-attention kernels F.scaled_dot_product_attention dispatches to (those this torch has)."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_fused_attention_overrideable")
    return tuple(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


ATTENTION_OPS = _attention_ops()


def _keep_attention_policy(ctx, op, *args, **kwargs):
    """Selective checkpointing: keep the fused attention kernels' outputs (O and the row log-sum-exp,
    what their backward needs), recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# What a checkpointed block recomputes in backward (checkpoint keyword arguments per policy):
#   full            every op of the block: the least memory, one more forward of the block per backward
#   keep_attention  every op except the fused attention kernels (self- and cross-attention), whose outputs
#                   stay in memory: at the Wan-1.3B shape (32 760 tokens) attention is most of a block's
#                   FLOPs (4·L²·dim = 6.6 TFLOP against 2·L·46M = 3.0 for its linears), and keeping its output costs
#                   L·dim·2 bytes per attention (~100 MB at bf16) instead of the ~5 GB a block keeps
#                   without checkpointing. Attention that is not a fused SDPA kernel (SLA's Triton
#                   kernels, the math backend) is recomputed as under "full".
CHECKPOINT_POLICIES = {
    "full": dict,
    "keep_attention": lambda: {"context_fn": partial(create_selective_checkpoint_contexts, _keep_attention_policy)},
}


class WanModel(nn.Module):
    """Wan2.1 T2V DiT: velocity v(x_s, 1000·s, text) for latents x of shape (B, C, F, H, W)."""

    def __init__(self, config: "WanConfig | str"):
        super().__init__()
        cfg = self.config = get_config(config)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self.rope = RoPE3D(cfg.head_dim, cfg.rope_theta)
        self._token_orders: dict = {}  # (grid, tile, device) -> (perm, inverse): token_order's cache
        if cfg.frame_embed_len:  # zero at the start: the network's function is unchanged until it trains
            self.frame_embedding = nn.Parameter(torch.zeros(cfg.frame_embed_len, cfg.dim))
        if cfg.space_embed_len:  # the same for the latent row and column of a token
            self.row_embedding = nn.Parameter(torch.zeros(cfg.space_embed_len, cfg.dim))
            self.col_embedding = nn.Parameter(torch.zeros(cfg.space_embed_len, cfg.dim))
        self.gradient_checkpointing = False  # activation checkpointing when training: True, False or first N blocks
        self.checkpoint_policy = "full"  # what a checkpointed block recomputes (CHECKPOINT_POLICIES)
        self.sequence_shard = None  # set by turbo_infer.sequence_parallel (Ulysses); None = single device
        self.init_weights()

    def init_weights(self):
        """Xavier linears, zero biases (as Wan's reference init); the head starts at zero output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.head.head.bias)

    def enable_activation_checkpointing(self, enabled: "bool | int" = True, policy: str | None = None) -> "WanModel":
        """Recompute blocks in backward instead of keeping their activations: True = every block,
        False/0 = none, an int N = the first N blocks (the rest keep theirs: less recompute where memory
        allows; Megatron's recompute_num_layers). policy: what a checkpointed block recomputes,
        "full" (everything) or "keep_attention" (everything but the attention kernels, whose outputs are
        kept: see CHECKPOINT_POLICIES); None leaves it as it is."""
        if policy is not None:
            if policy not in CHECKPOINT_POLICIES:
                raise ValueError(f"checkpoint policy must be one of {list(CHECKPOINT_POLICIES)}, got {policy!r}")
            self.checkpoint_policy = policy
        if isinstance(enabled, bool):
            self.gradient_checkpointing = enabled
            return self
        if not isinstance(enabled, int) or enabled < 0:
            raise ValueError(f"activation checkpointing: True, False or a number of blocks >= 0, got {enabled!r}")
        n = min(enabled, self.config.num_layers)
        self.gradient_checkpointing = True if n == self.config.num_layers else (n or False)
        return self

    def fuse_norm_quant(self, enabled: bool = True) -> "WanModel":
        """In inference, give the W8A8 layers after each LayerNorm (q/k/v, the cross-attention's q, a
        W8A8GeluFFN) their input quantized by one fused norm + modulation + quantization pass instead of a
        bf16 copy that each of them quantizes again (turbo_infer.quant.norm_quantized_input). Bundles turn it
        on; models being calibrated or trained keep the plain path (their hooks see tensors)."""
        for block in self.blocks:
            block.fused_norm_quant = enabled
        return self

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> "WanModel":
        """Regional compilation: each block's forward through torch.compile, in place (parameter names
        unchanged). The blocks are identical, so they share one compiled graph and compile time is about
        one block's; the runtime's Triton kernels are custom ops, opaque to the compiler, and what it
        fuses is the elementwise work between them (H200, Wan-1.3B shape, 4-step DiT: 0.798 s compiled
        vs 0.997 s eager, BENCHMARKS.md). The first forward afterwards compiles (or loads Inductor's
        on-disk cache). `uncompile_blocks` undoes it. (One graph for all blocks needs dynamo to inline
        nn.Modules, its default since torch 2.5.)"""
        for block in self.blocks:
            block.compile(backend=backend, mode=mode)
        return self

    def uncompile_blocks(self) -> "WanModel":
        """Back to eager blocks after `compile_blocks`."""
        for block in self.blocks:
            block._compiled_call_impl = None
        return self

    def checkpointed_blocks(self) -> int:
        """How many blocks (the first ones) recompute their activations in backward."""
        g = self.gradient_checkpointing
        return self.config.num_layers if g is True else int(g or 0)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, C, F, H, W) -> tokens (B, L, dim) and the token grid (F', H', W')."""
        pt, ph, pw = self.config.patch_size
        _, _, f, h, w = x.shape
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent (F, H, W)=({f}, {h}, {w}) must be divisible by the patch size {self.config.patch_size}")
        tokens = self.patch_embedding(x)  # (B, dim, F', H', W')
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2).contiguous(), grid  # (B, L, dim)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, C·pt·ph·pw) -> (B, C, F'·pt, H'·ph, W'·pw)."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        B = x.shape[0]
        x = x.reshape(B, f, h, w, pt, ph, pw, -1)  # (B, F', H', W', pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
        return x.reshape(B, -1, f * pt, h * ph, w * pw)

    def token_order(self, grid: tuple[int, int, int], device) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """(perm, inverse) of the tile order that attention_options.token_tile asks for on this grid (cached),
        or None for raster order."""
        tile = self.config.attention_options.get(TOKEN_TILE)
        if tile is None:
            return None
        key = (tuple(grid), tuple(tile), str(device))
        if key not in self._token_orders:
            perm = tile_permutation(grid, tile, device)
            self._token_orders[key] = (perm, inverse_permutation(perm))
        return self._token_orders[key]

    def position_rows(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The learned absolute-position embedding of every token of a (F', H', W') grid, in token order:
        (L, dim), the sum of the frame table's row (frame_embed_len) and the row and column tables' rows
        (space_embed_len) that the config has."""
        f, h, w = grid
        cfg = self.config
        e = torch.zeros(f, h, w, cfg.dim, device=self.patch_embedding.weight.device)
        if cfg.frame_embed_len:
            if f > cfg.frame_embed_len:
                raise ValueError(f"{f} latent frames of {cfg.patch_size[0]}-frame patches, but the frame embedding "
                                 f"has {cfg.frame_embed_len} rows (WanConfig.frame_embed_len)")
            e = e + self.frame_embedding[:f, None, None, :].float()
        if cfg.space_embed_len:
            if max(h, w) > cfg.space_embed_len:
                raise ValueError(f"a token grid of {h} x {w} (height x width), but the row and column embeddings "
                                 f"have {cfg.space_embed_len} rows (WanConfig.space_embed_len)")
            e = e + self.row_embedding[None, :h, None, :].float() + self.col_embedding[None, None, :w, :].float()
        return e.reshape(f * h * w, cfg.dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict the rectified-flow velocity.

        x: (B, C_in, F, H, W) noisy latents; timestep: (B,) or scalar, float, 1000·s in [0, 1000];
        context: (B, L_text, text_dim) text-encoder states (zero-padded). Returns (B, C_out, F, H, W).
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, F, H, W), got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be (B, L, {cfg.text_dim}), got {tuple(context.shape)}")
        B = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        dtype = self.patch_embedding.weight.dtype

        tokens, grid = self.patchify(x.to(dtype))  # (B, L, dim)
        if cfg.frame_embed_len or cfg.space_embed_len:
            tokens = tokens + self.position_rows(grid).to(tokens.dtype)
        rope = self.rope.freqs(grid, x.device)
        order = self.token_order(grid, x.device)
        if order is not None:  # tile order for block-sparse attention (token_order.py): tokens and their RoPE rows
            tokens, rope = tokens[:, order[0]], tuple(r[order[0]] for r in rope)
        # time: sinusoid (fp32) -> MLP -> 6-way modulation, kept in fp32
        temb = self.time_embedding(sinusoidal_embedding(timestep, cfg.freq_dim).to(dtype)).float()  # (B, dim)
        e = self.time_projection(temb.to(dtype)).float().unflatten(1, (6, cfg.dim))  # (B, 6, dim)
        ctx = self.text_embedding(context.to(dtype))  # (B, Lc, dim)
        sp = self.sequence_shard
        if sp is not None:  # Ulysses: this rank keeps L/P tokens (and their RoPE rows) until the head
            rope = tuple(sp.shard(r, dim=0) for r in rope)
            tokens = sp.shard(tokens, dim=1)  # (B, L/P, dim)

        recompute = self.checkpointed_blocks() if torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if i < recompute:
                tokens = checkpoint(block, tokens, e, ctx, rope, use_reentrant=False,
                                    **CHECKPOINT_POLICIES[self.checkpoint_policy]())
            else:
                tokens = block(tokens, e, ctx, rope)
        return self.output(tokens, temb, grid, x, timestep)

    def output(self, tokens: torch.Tensor, temb: torch.Tensor, grid: tuple, x: torch.Tensor,
               timestep: torch.Tensor) -> torch.Tensor:
        """The forward's tail: the last block's tokens (B, L, dim) (this rank's share under sequence parallelism,
        in the attention's token order) -> the velocity (B, C_out, F, H, W), fp32: head, gather, raster order,
        unpatchify, and for x0-prediction models the velocity that x̂0 implies for the input x at `timestep`
        ((B,), 1000·s). Calibration runs the blocks from a captured state and finishes through it."""
        out = self.head(tokens, temb)  # (B, L, C·p)
        if self.sequence_shard is not None:
            out = self.sequence_shard.gather(out, dim=1)  # (B, L, C·p)
        order = self.token_order(grid, x.device)
        if order is not None:
            out = out[:, order[1]]  # back to raster order
        out = self.unpatchify(out, grid).float()
        if self.config.prediction == "x0":  # the head's output is x̂0: return the velocity it implies
            s = (timestep.float() / 1000.0).clamp(min=X0_MIN_S).view(x.shape[0], 1, 1, 1, 1)
            out = (x.float() - out) / s
        return out

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path,
        config: "str | WanConfig | dict | None" = None,
        device: "torch.device | str | None" = None,
        dtype: "torch.dtype | None" = None,
        strict: bool = True,
        **overrides,
    ) -> "WanModel":
        """Load weights (official Wan or diffusers layout; single file, sharded index or directory).

        config: preset name / WanConfig / dict; None = read `config.json` beside the weights or infer the
        preset from tensor shapes. overrides: WanConfig fields to change (e.g. attention="sla").
        strict: refuse a missing or unexpected tensor, except those that start at zero by design (SLA's
        proj_l, so a dense checkpoint loads as an untrained SLA model; the position tables (frame, row and
        column embeddings) that `frame_embed_len` / `space_embed_len` add to a checkpoint without them)."""
        from turbo_infer.models.wan_keys import load_wan_state_dict

        state, file_config = load_wan_state_dict(path)
        cfg = checkpoint_config(state, file_config, path, config, **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        # Parameters of the self-attention backend itself (SLA's proj_l, under `.self_attn.attn.`) are
        # absent from a dense checkpoint and start at zero by design (an untrained SLA model), as do
        # position tables added by an override (POSITION_TABLES), strict or not; strict=True refuses any other missing or
        # unexpected tensor (a checkpoint stored as SLA without its proj_l among them), strict=False
        # zero-fills too.
        if strict:
            # (only what the checkpoint's own config does not have: an SLA checkpoint's proj_l, or a frame
            # embedding its config claims, must be in the file)
            stored = file_config or {}
            new_sla = stored.get("attention") not in SPARSE_BACKENDS
            new_tables = {n for n, field_ in POSITION_TABLES.items()
                          if getattr(cfg, field_) and not stored.get(field_)}
            other = [n for n in missing if not (".self_attn.attn." in n and new_sla) and n not in new_tables]
            if other or unexpected:
                raise RuntimeError(f"{path}: checkpoint does not fit the model: missing {other}, unexpected "
                                   f"{unexpected}")
        for name in missing:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            old = getattr(mod, attr)
            setattr(mod, attr, nn.Parameter(torch.zeros(old.shape, dtype=torch.float32), requires_grad=old.requires_grad))
        for name, p in model.named_parameters():
            if p.is_meta:
                raise ValueError(f"{path}: checkpoint has no tensor for parameter {name!r}")
        return model.to(device=device, dtype=dtype)
