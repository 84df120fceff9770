"""Low-bit attention backends: `sage` (dense) and `sagesla` (sparse-linear), forward only.

sage:    SageAttention-style dense attention (turbo_kernels.attention.lowbit): int8 QKᵀ with
         smoothed K, fp8 e4m3 PV on sm89+ (fp16 PV on sm80), fp32 accumulation.
sagesla: SLA (turbo_infer.layers.sla.SparseLinearAttention) whose sparse branch runs the same
         low-bit arithmetic (turbo_kernels.attention.lowbit_sparse); the block map
         (turbo_kernels.attention.blockmap.sla_block_map), the linear branch and the zero-init
         fp32 `proj_l` are SLA's own: O = O_s^lowbit + proj_l(O_l).

Which kernels run is decided by turbo_kernels.capability.kernel_support for the tensors' device;
CPU tensors (and GPUs without int8 tensor cores) run the torch references, which emulate the
quantization exactly. These backends are for inference: their kernels have no backward.
"""
from __future__ import annotations

import torch
from torch import nn

from turbo_kernels.attention.lowbit import PV_MODES
from turbo_infer.layers.attention import register_attention
from turbo_infer.layers.compile_ops import sage_forward, sagesla_forward
from turbo_infer.layers.sla import SparseLinearAttention


def _check_pv(pv):
    if pv is not None and pv not in PV_MODES:
        raise ValueError(f"pv must be None (choose by device) or one of {PV_MODES}, got {pv!r}")


class SageAttention(nn.Module):
    """Dense low-bit attention over (B, H, L, D) → (B, H, L, D) in q's dtype.

    head_dim: D (a power of two in [16, 256]).
    pv:       "fp8" | "fp16" | None (None: fp8 where the GPU has fp8 tensor cores, else fp16;
              the CPU reference emulates fp8).
    """

    def __init__(self, head_dim: int, pv: str | None = None):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two in [16, 256] for low-bit attention, got {head_dim!r}")
        _check_pv(pv)
        self.head_dim, self.pv = head_dim, pv

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D)
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q has head dim {q.shape[-1]}, this SageAttention was built for {self.head_dim}")
        # the kernels on a GPU with int8 tensor cores, else the reference; one opaque op for torch.compile
        return sage_forward(q, k, v, self.pv or "auto")

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, pv={self.pv or 'auto'}"


class SageSparseLinearAttention(SparseLinearAttention):
    """SLA with a low-bit sparse branch; same options and `proj_l` as SparseLinearAttention, plus pv."""

    def __init__(self, head_dim: int, topk: float = 0.1, block_q: int = 128, block_k: int = 64,
                 feature_map: str = "softmax", pv: str | None = None):
        super().__init__(head_dim, topk=topk, block_q=block_q, block_k=block_k, feature_map=feature_map)
        if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two in [16, 256] for low-bit attention, got {head_dim!r}")
        for name, blk in (("block_q", block_q), ("block_k", block_k)):
            if blk > 128:
                raise ValueError(f"{name} must be <= 128 for the low-bit kernels, got {blk}")
        _check_pv(pv)
        self.pv = pv

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D)
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q has head dim {q.shape[-1]}, this attention was built for {self.head_dim}")
        # the kernels on a GPU with int8 tensor cores, else the references (emulating the quantization
        # exactly); one opaque op for torch.compile
        return sagesla_forward(q, k, v, self.proj_l.weight, self.proj_l.bias, self.topk, self.block_q, self.block_k,
                               self.feature_map, self.pv or "auto")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pv={self.pv or 'auto'}"


register_attention("sage", lambda head_dim, **o: SageAttention(head_dim, **o))
register_attention("sagesla", lambda head_dim, **o: SageSparseLinearAttention(head_dim, **o))

__all__ = ["SageAttention", "SageSparseLinearAttention"]
