"""Pluggable attention backends for the Wan DiT.

A backend is an nn.Module built once per attention layer (SLA owns a `proj_l` per layer), called
as `backend(q, k, v)` with q, k, v of shape (B, H, L, D) and returning (B, H, L, D). Backends
register themselves by name; the model picks one per layer from its config:

    sdpa     torch scaled_dot_product_attention (the reference; any device)
    sla      sparse-linear attention (turbo_kernels.attention.sla), self-attention only
    sage     low-bit dense attention (INT8 QK, FP8/FP16 PV)
    sagesla  low-bit sparse-linear attention

Modules that implement a backend live in their own files and call `register_attention` at import;
`make_attention` imports the known providers lazily so that the runtime only pulls in Triton when a
Triton backend is asked for.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# Backends whose module is a SparseLinearAttention: they own a trained projection `proj_l`.
SPARSE_BACKENDS = ("sla", "sagesla")
# Backends whose modules register themselves on import (name -> module path).
_PROVIDERS: dict[str, str] = {
    "sla": "turbo_infer.layers.sla",
    "sage": "turbo_infer.layers.lowbit_attention",
    "sagesla": "turbo_infer.layers.lowbit_attention",
}


def register_attention(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register `factory(head_dim, **options) -> nn.Module` under `name`."""
    _REGISTRY[name] = factory


def available_attention() -> list[str]:
    return sorted(set(_REGISTRY) | set(_PROVIDERS))


def make_attention(name: str, head_dim: int, **options) -> nn.Module:
    """Build the attention module `name` for heads of size `head_dim`."""
    if name not in _REGISTRY and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {available_attention()}")
    return _REGISTRY[name](head_dim, **options)


class SDPAttention(nn.Module):
    """Dense softmax attention through torch's scaled_dot_product_attention (the reference)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D)
        return F.scaled_dot_product_attention(q, k, v)


register_attention("sdpa", lambda head_dim, **_: SDPAttention(head_dim))
