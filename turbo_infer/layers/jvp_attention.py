"""Attention backend "sdpa_jvp": dense softmax attention that rCM can differentiate forward-mode.

rCM's tangent dF/dt comes from torch.func.jvp through the whole student (RCM.md section 5), and the
same student then runs a forward with grad. This backend serves both with one module:

    CUDA (or CPU under TRITON_INTERPRET=1)  turbo_kernels.attention.jvp_attention.jvp_flash_attention:
                                            no-grad JVP (rCM's tangent pass) -> one fused Triton pass
                                            for (O, tO); grads needed -> SDPA forward and backward
                                            (a jvp rule too); plain inference -> SDPA
    CPU otherwise                           F.scaled_dot_product_attention on the math backend: the
                                            CPU flash kernel has no forward-AD formula, math has one

Numerically it is the `sdpa` backend; only the JVP path differs. Select it with the model's
attention config ("sdpa_jvp") or `make_attention("sdpa_jvp", head_dim)` after importing this module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from turbo_infer.layers.attention import register_attention
from turbo_kernels.attention.jvp_attention import check_attention_inputs, jvp_flash_attention
from turbo_kernels.utils import use_triton


class JVPAttention(nn.Module):
    """softmax(q k^T * scale) v with a fused forward-mode (JVP) rule.

    head_dim: D of q/k; scale: softmax scale, None -> 1/sqrt(head_dim); tiles: optional kernel
    tile overrides (block_m, block_n, num_warps, num_stages), None -> per-device defaults.
    """

    def __init__(self, head_dim: int, scale: float | None = None, **tiles):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        unknown = set(tiles) - {"block_m", "block_n", "num_warps", "num_stages"}
        if unknown:
            raise ValueError(f"unknown tile options {sorted(unknown)} for sdpa_jvp")
        self.head_dim = head_dim
        self.scale = scale
        self.tiles = tiles

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv) -> (B, H, Lq, Dv)
        if q.dim() == 4 and q.shape[-1] != self.head_dim:
            raise ValueError(f"q must have head dim {self.head_dim}, got {tuple(q.shape)}")
        scale = check_attention_inputs(q, k, v, scale=self.scale)
        if use_triton(q, k, v):
            return jvp_flash_attention(q, k, v, scale, **self.tiles)
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, scale={self.scale}"


register_attention("sdpa_jvp", lambda head_dim, **options: JVPAttention(head_dim, **options))
