"""The umT5 encoder (Wan2.1's text encoder) in plain PyTorch: no transformers import on the runtime's path.

`transformers` takes seconds to import and to build the 5.7 B-parameter `UMT5EncoderModel`; for the time
to first video (BENCHMARKS.md "End to end") the runtime builds this module instead, on the meta device,
and fills it from the same safetensors files (the transformers key layout: `shared.weight`,
`encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o,relative_attention_bias}.weight`, ...). The math is
T5's encoder as umT5 configures it (Xue et al. 2021; Chung et al. 2023, "UniMax"):

    h = embed(ids)
    per block:  h = h + O(softmax(Q Kᵀ + bias_rel + mask) V)   on RMSNorm(h)   (no 1/√d scaling)
                h = h + W_o(act(W_i0 x) * W_i1 x)              on RMSNorm(h)   (gated-gelu: tanh GELU)
    out = RMSNorm(h)

with a relative-position bias in every block (umT5; T5 has it in the first only): bucketed distances,
bidirectional, half the buckets exact and half logarithmic up to `relative_attention_max_distance`.
RMSNorm accumulates in fp32 and casts back to the weight's dtype before scaling, as the reference.
tests/infer/test_umt5.py checks it against transformers' UMT5EncoderModel at a tiny config.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding; built on the meta device (to be filled from a checkpoint) without its normal_ init,
    which on meta tensors runs torch's Python refs, whose first use imports torch._dynamo (~1 s of a fresh
    process's start)."""
    w = torch.empty(num, dim)
    return nn.Embedding(num, dim, _weight=w) if w.is_meta else nn.Embedding(num, dim)


@dataclass(frozen=True)
class UMT5Config:
    """The encoder's shape, as transformers' config.json spells it (Wan: umT5-XXL)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"UMT5Config.{f.name} must be a positive int, got {v!r}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("UMT5Config.relative_attention_num_buckets must be >= 4")
        self.activation  # noqa: B018 - validates feed_forward_proj

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self):
        name = self.feed_forward_proj.removeprefix("gated-")
        if name not in ACTIVATIONS:
            raise ValueError(f"UMT5Config.feed_forward_proj {self.feed_forward_proj!r} is not supported "
                             f"(one of {sorted(ACTIVATIONS)}, optionally 'gated-')")
        return ACTIVATIONS[name]

    @classmethod
    def from_json(cls, path) -> "UMT5Config":
        """From a transformers config.json (other keys ignored); ValueError naming the file otherwise."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable config ({e})") from None
        if raw.get("is_encoder_decoder") is False and raw.get("is_decoder"):
            raise ValueError(f"{path}: a decoder config, not an encoder")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, d_model)


class RMSNorm(nn.Module):
    """T5's LayerNorm: x / rms(x) (fp32 statistics), then cast to the weight's dtype and scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = _embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model); buckets (L, L) long; mask (B, 1, 1, L) additive, in x's dtype."""
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None].to(q.dtype)  # (1, H, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, self.heads * self.d_kv))


class Sublayer(nn.Module):
    """A pre-norm sublayer: its RMS norm and its function, under the attribute name the checkpoints'
    keys use ("SelfAttention", "DenseReluDense")."""

    def __init__(self, cfg: UMT5Config, name: str, inner: nn.Module):
        super().__init__()
        setattr(self, name, inner)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class FeedForward(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.act = cfg.activation
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if hasattr(self, "wi_0") else self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.layer = nn.ModuleList([Sublayer(cfg, "SelfAttention", SelfAttention(cfg)),
                                    Sublayer(cfg, "DenseReluDense", FeedForward(cfg))])

    def forward(self, h: torch.Tensor, buckets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        h = h + attn.SelfAttention(attn.layer_norm(h), buckets, mask)
        return h + ff.DenseReluDense(ff.layer_norm(h))


class Stack(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """(L, L) bucket of key position j relative to query position i (bidirectional T5 bucketing): half
    the buckets for j < i and half for j > i; within each half, distances below a quarter of the buckets
    exactly, larger ones logarithmically up to max_distance (and beyond it the last bucket)."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    rel = pos[None, :] - pos[:, None]  # key - query
    half = num_buckets // 2
    out = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    large = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return out + torch.where(dist < exact, dist, large)


class UMT5Encoder(nn.Module):
    """umT5's encoder: `forward(input_ids, attention_mask)` -> EncoderOutput(last_hidden_state), the
    interface the text encoders call (transformers' UMT5EncoderModel answers the same)."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.shared = _embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        h = self.shared(input_ids)
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.zeros(B, 1, 1, L, dtype=h.dtype, device=h.device)
        mask = mask.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(h.dtype).min)
        cfg = self.config
        buckets = relative_position_buckets(L, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance, h.device)
        for block in self.encoder.block:
            h = block(h, buckets, mask)
        return EncoderOutput(self.encoder.final_layer_norm(h))

    @classmethod
    def from_state(cls, config: UMT5Config, state: dict, source="state dict",
                   dtype: torch.dtype | None = None) -> "UMT5Encoder":
        """Built on the meta device and filled with `state` (transformers' keys; tensors are taken on their
        device, without a copy where `dtype` is None or theirs, floating-point ones cast to `dtype`);
        ValueError naming `source` on missing or unknown keys."""
        from turbo_infer.fastload import assign_state

        state = dict(state)
        embed = state.pop("encoder.embed_tokens.weight", None)  # transformers ties it to shared
        if "shared.weight" not in state and embed is not None:
            state["shared.weight"] = embed
        with torch.device("meta"):
            model = cls(config)
        missing, unexpected = assign_state(model, state, dtype)
        if missing or unexpected:
            raise ValueError(f"{source}: does not match a umT5 encoder of {config}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        return model.eval().requires_grad_(False)


__all__ = ["EncoderOutput", "UMT5Config", "UMT5Encoder", "relative_position_buckets"]
