"""SparseLinearAttention: the `sla` self-attention backend (module wrapper of turbo_kernels SLA).

Follows Zhang et al. 2025 (SLA, arXiv 2509.24006): O = O_s + proj_l(O_l), exact softmax attention
over each query block's critical key blocks plus linear attention over the marginal ones (see
`turbo_kernels.attention.sla` for the definition and the choices made). The module owns the
per-layer projection `proj_l`, zero-initialised (a freshly swapped-in layer starts as pure block-
sparse attention and fine-tuning grows the linear branch) and kept in float32 even when the model
is cast to bf16/fp16.

CUDA tensors go through the Triton kernels; CPU tensors through `sla_torch` (plain torch at SLA's cost:
gathered critical blocks + block-GEMM linear branch; always, also under TRITON_INTERPRET=1, so CPU model
tests stay fast), which tests hold equal to the dense-mask reference.
"""
from __future__ import annotations

import torch
from torch import nn

from turbo_kernels.attention.sla import FEATURE_MAPS, SLAKernelConfig, sla_attention, sla_torch
from turbo_kernels.utils import check_block
from turbo_infer.layers.attention import register_attention
from turbo_infer.layers.compile_ops import sla_forward


class SparseLinearAttention(nn.Module):
    """Sparse-linear attention over q, k, v of shape (B, H, L, D) -> (B, H, L, D) in q's dtype.

    head_dim:    D, the size of each head (proj_l is Linear(D, D)).
    topk:        fraction of key blocks kept exact per query block, in (0, 1];
                 n = max(1, int(topk * ceil(L / block_k))). 1.0 = dense attention (+ proj_l bias).
    block_q:     query tokens per block of the block map (power of two >= 16).
    block_k:     key tokens per block of the block map (power of two >= 16).
    feature_map: phi of the linear branch over the head dim: "softmax", "elu" (elu+1) or "relu".
    config:      Triton tiles/warps/stages (None: the tuned defaults of turbo_kernels).
    """

    def __init__(self, head_dim: int, topk: float = 0.1, block_q: int = 128, block_k: int = 64,
                 feature_map: str = "softmax", config: SLAKernelConfig | None = None):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not (0.0 < float(topk) <= 1.0):
            raise ValueError(f"topk must be a float in (0, 1], got {topk!r}")
        check_block("block_q", block_q)
        check_block("block_k", block_k)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self.head_dim, self.topk, self.block_q, self.block_k = head_dim, float(topk), block_q, block_k
        self.feature_map, self.config = feature_map, config
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    def _apply(self, fn, *args, **kwargs):
        # model.to(torch.bfloat16) / .half() must not lower proj_l: it stays float32.
        out = super()._apply(fn, *args, **kwargs)
        if self.proj_l.weight.dtype != torch.float32:
            self.proj_l.float()
        return out

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D)
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q has head dim {q.shape[-1]}, this SparseLinearAttention was built for {self.head_dim}")
        if q.is_cuda:
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *self.proj_l.parameters()))
            if not grad and self.config is None:  # inference: one opaque op for torch.compile
                return sla_forward(q, k, v, self.proj_l.weight, self.proj_l.bias, self.topk, self.block_q,
                                   self.block_k, self.feature_map)
            return sla_attention(q, k, v, self.proj_l.weight, self.proj_l.bias, self.topk, self.block_q,
                                 self.block_k, self.feature_map, config=self.config)
        return sla_torch(q, k, v, self.topk, self.block_q, self.block_k, self.feature_map, self.proj_l)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, topk={self.topk}, block_q={self.block_q}, block_k={self.block_k}, "
                f"feature_map={self.feature_map!r}")


register_attention("sla", lambda head_dim, **o: SparseLinearAttention(head_dim, **o))
