"""Block map of sparse-linear attention: which key blocks each query block attends to exactly.

Follows SLA (Zhang et al. 2025, "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable
Sparse-Linear Attention", Sec. 4.1) and DESIGN.md "Sparse-linear attention". Per (batch, head):

    K~  = K - mean_tokens(K)                          # smooth K (SageAttention's trick)
    q_i = mean of Q over query block i                # block_q tokens, ragged tail: valid tokens only
    k_j = mean of K~ over key block j                 # block_k tokens, same rule
    P   = softmax(q k^T / sqrt(d))                    # (Nq, Nk) block-level attention
    critical(i) = top-n key blocks of P[i],  n = max(1, int(topk * Nk))

The top-n of a softmax row equals the top-n of its logits (softmax is monotone), so selection is
done on the unscaled logits q k^T: same set, two passes less, and no ties introduced by rounding.

`BlockMap.lut` (B, H, Nq, n) int32 holds each query block's critical key blocks in ascending
order (the sparse forward and dQ kernels walk it). `BlockMap.inverse()` builds, on first use, the
key-major inverted table in CSR form -- for each key block the ascending list of query blocks
that selected it -- which the dK/dV kernel walks instead of scanning a dense Nq x Nk map.

Reference first (`sla_block_map_reference`, literal and pure torch), then the Triton pooling
kernel (one read of Q and K; the torch path needs a padded copy for ragged tails), then
`sla_block_map` which pools with Triton where available and shares the selection code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from turbo_kernels.utils import cdiv, check_block, check_float_dtype, next_power_of_2, use_triton

__all__ = ["BlockMap", "sla_block_map", "sla_block_map_reference", "pool_blocks", "pool_blocks_reference",
           "num_selected", "check_qk", "topk_select", "SELECTS"]


@dataclass
class BlockMap:
    """Critical key blocks per query block (see module docstring).

    lut:          (B, H, num_q_blocks, n) int32, ascending key-block indices per query block.
    n:            selected key blocks per query block, max(1, int(topk * num_k_blocks)).
    num_q_blocks: ceil(q_len / block_q);  num_k_blocks: ceil(k_len / block_k).
    block_q, block_k: tokens per query / key block.
    q_len, k_len: sequence lengths the map was built for (ragged tails are partial blocks).
    k_mean:       (B, H, D) fp32 token mean of K that the map smoothed with (None for maps built elsewhere):
                  sagesla's K quantization smooths with the same mean instead of another pass over K.
    """

    lut: torch.Tensor
    n: int
    num_q_blocks: int
    num_k_blocks: int
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    _inverse: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    k_mean: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.lut.shape[0], self.lut.shape[1]

    def inverse(self, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Key-major inverted table in CSR form (cached unless cache=False).

        Returns (kv_offsets, kv_qidx):
          kv_offsets (B, H, num_k_blocks + 1) int32: query blocks that selected key block j are
                     kv_qidx[b, h, kv_offsets[b, h, j] : kv_offsets[b, h, j + 1]];
          kv_qidx    (B, H, num_q_blocks * n) int32, ascending within each key block.
        Built by one sort of (key block, query block) pairs: O(Nq * n log) work, no dense map.
        """
        if self._inverse is None or not cache:
            B, H, Nq, n = self.lut.shape
            Nk = self.num_k_blocks
            lut = self.lut.reshape(B * H, Nq * n).long()
            qid = torch.arange(Nq, device=lut.device).repeat_interleave(n)  # (Nq*n,)
            pair = lut * Nq + qid  # sort key: key block major, query block minor
            kv_qidx = (pair.sort(dim=-1).values % Nq).to(torch.int32)
            counts = torch.zeros(B * H, Nk, dtype=torch.int64, device=lut.device)
            counts.scatter_add_(1, lut, torch.ones_like(lut))
            kv_offsets = torch.zeros(B * H, Nk + 1, dtype=torch.int64, device=lut.device)
            kv_offsets[:, 1:] = counts.cumsum(-1)
            inverse = (kv_offsets.to(torch.int32).reshape(B, H, Nk + 1), kv_qidx.reshape(B, H, Nq * n))
            if not cache:
                return inverse
            self._inverse = inverse
        return self._inverse

    def dense(self) -> torch.Tensor:
        """(B, H, num_q_blocks, num_k_blocks) bool map, True where a key block is critical."""
        B, H, Nq, _ = self.lut.shape
        m = torch.zeros(B, H, Nq, self.num_k_blocks, dtype=torch.bool, device=self.lut.device)
        return m.scatter_(-1, self.lut.long(), True)

    def token_mask(self) -> torch.Tensor:
        """(B, H, q_len, k_len) bool token-level mask of the critical blocks (reference use only)."""
        m = self.dense()
        m = m.repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        return m.repeat_interleave(self.block_k, dim=3)[:, :, :, : self.k_len]


def num_selected(topk: float, num_k_blocks: int) -> int:
    """n = max(1, int(topk * Nk)): critical key blocks per query block."""
    return max(1, int(topk * num_k_blocks))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: reference / gradcheck


def check_qk(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int, block_k: int) -> None:
    """Validate the block-map arguments; errors name the offending argument."""
    check_float_dtype("q", q, _FLOATS)
    check_float_dtype("k", k, _FLOATS)
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, L, D), got {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must have shape (B, H, L, D), got {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    if q.shape[2] < 1 or k.shape[2] < 1 or q.shape[-1] < 1:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have L >= 1 and D >= 1")
    if q.device != k.device:
        raise ValueError(f"q ({q.device}) and k ({k.device}) must be on the same device")
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise TypeError(f"topk must be a float in (0, 1], got {type(topk).__name__}")
    if not (0.0 < float(topk) <= 1.0):
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    check_block("block_q", block_q)
    check_block("block_k", block_k)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def pool_blocks_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of x (B, H, L, D) over blocks of `block` tokens (ragged tail: its valid tokens).

    Returns (B, H, ceil(L / block), D) float32.
    """
    B, H, L, D = x.shape
    nb = cdiv(L, block)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - L))  # (B, H, nb*block, D)
    sums = xf.view(B, H, nb, block, D).sum(dim=3)  # (B, H, nb, D)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = L - (nb - 1) * block
    return sums / counts[:, None]


def _topk_sorted(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Column indices of the n largest entries of each row of `logits`, ascending (torch)."""
    return torch.topk(logits, n, dim=-1, sorted=False).indices.sort(dim=-1).values


def _select(pq: torch.Tensor, pk: torch.Tensor, topk: float, block_q: int, block_k: int,
            q_len: int, k_len: int, select: str = "torch", k_mean: torch.Tensor | None = None) -> BlockMap:
    """Top-n selection on pooled (B, H, N, D) float32 blocks; shared by both paths. select: "torch"
    (torch.topk + sort) or "triton" (`topk_select`, one kernel; ties broken towards lower indices)."""
    D = pq.shape[-1]
    Nq, Nk = pq.shape[2], pk.shape[2]
    n = num_selected(topk, Nk)
    # q k^T without the 1/sqrt(d): a positive scale keeps every row's order (rounding can only merge
    # near-ties, never swap two logits), so the top-n set is that of softmax(q k^T / sqrt(d)); one launch less
    # in fp32 even under autocast (a bf16 autocast region would round the logits, merging near-ties,
    # and topk_select takes float32 only)
    with torch.autocast(device_type=pq.device.type, enabled=False):
        logits = torch.matmul(pq.float(), pk.float().transpose(-1, -2))  # (B, H, Nq, Nk)
    if n == Nk:
        idx = torch.arange(Nk, device=pq.device).expand(*logits.shape[:3], Nk)
    elif select == "triton":
        idx = topk_select(logits.reshape(-1, Nk), n).view(*logits.shape[:3], n)
    else:
        idx = _topk_sorted(logits, n)
    return BlockMap(lut=idx.to(torch.int32).contiguous(), n=n, num_q_blocks=Nq, num_k_blocks=Nk,
                    block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, k_mean=k_mean)


def sla_block_map_reference(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int = 128,
                            block_k: int = 64) -> BlockMap:
    """Pure-torch block map, literally as in the module docstring. q, k: (B, H, L, D)."""
    check_qk(q, k, topk, block_q, block_k)
    k_mean = k.float().mean(dim=2)  # (B, H, D)
    k_smooth = k.float() - k_mean[:, :, None]  # (B, H, Lk, D)
    pq = pool_blocks_reference(q, block_q)  # (B, H, Nq, D)
    pk = pool_blocks_reference(k_smooth, block_k)  # (B, H, Nk, D)
    return _select(pq, pk, topk, block_q, block_k, q.shape[2], k.shape[2], k_mean=k_mean)


# ----------------------------------------------------------------------------------------------
# Triton pooling kernel
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference path is used
    triton = None

if triton is not None:

    @triton.jit
    def _pool_kernel(X, OUT, H, L, D, stride_xb, stride_xh, stride_xl, stride_ob, stride_oh, stride_on,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (block, batch*head): mean over the block's valid tokens, fp32 sum.
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_l = pid_n * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = X + b * stride_xb + h * stride_xh + offs_l[:, None] * stride_xl + offs_d[None, :]
        x = tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)
        count = tl.minimum(L - pid_n * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x.to(tl.float32), axis=0) / count
        tl.store(OUT + b * stride_ob + h * stride_oh + pid_n * stride_on + offs_d, mean, mask=offs_d < D)


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block means of x (B, H, L, D) -> (B, H, ceil(L/block), D) float32; Triton where it runs."""
    if triton is None or not use_triton(x):
        return pool_blocks_reference(x, block)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, L, D = x.shape
    nb = cdiv(L, block)
    out = torch.empty(B, H, nb, D, device=x.device, dtype=torch.float32)
    _pool_kernel[(nb, B * H)](x, out, H, L, D, x.stride(0), x.stride(1), x.stride(2),
                              out.stride(0), out.stride(1), out.stride(2),
                              BLOCK=block, BLOCK_D=max(16, next_power_of_2(D)), num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _topk_select_kernel(X, LUT, Nk, n, stride_x, stride_lut, BLOCK_NK: tl.constexpr):
        # One program per row of logits: the n largest, as ascending column indices. The floats become
        # order-preserving integers (sign-magnitude -> two's complement, then shifted to [0, 2^32)); a
        # 32-step bitwise search finds T, the n-th largest key; keys above T are taken, and of the keys
        # equal to T the lowest-indexed ones until n; a running count places each taken index.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_NK)
        valid = cols < Nk
        x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648  # float order, in [0, 2^32)
        key = tl.where(valid, key, -1)  # padding below every real key
        t = tl.zeros((), dtype=tl.int64)
        one = tl.full((), 1, tl.int64)
        for i in range(32):  # from the top bit down: keep a bit if at least n keys reach the prefix
            cand = t | (one << (31 - i))
            t = tl.where(tl.sum((key >= cand).to(tl.int32), axis=0) >= n, cand, t)
        above = key > t
        tied = (key == t).to(tl.int32)
        room = n - tl.sum(above.to(tl.int32), axis=0)
        take = above | ((key == t) & (tl.cumsum(tied, axis=0) <= room))
        pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(LUT + row * stride_lut + pos, cols.to(tl.int32), mask=take)


def topk_select(logits: torch.Tensor, n: int) -> torch.Tensor:
    """(R, Nk) float32 -> (R, n) int32: each row's n largest entries as ascending column indices, in
    one Triton kernel (the block map's torch.topk + sort, fused); ties go to the lower index. Finite
    inputs. Falls back to torch where Triton does not run."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a (R, Nk) float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    R, Nk = logits.shape
    if not 1 <= n <= Nk:
        raise ValueError(f"n must be in 1..{Nk}, got {n}")
    if triton is None or not use_triton(logits):
        return _topk_sorted(logits, n).to(torch.int32)
    logits = logits.contiguous()
    lut = torch.empty(R, n, device=logits.device, dtype=torch.int32)
    block = max(16, next_power_of_2(Nk))
    _topk_select_kernel[(R,)](logits, lut, Nk, n, logits.stride(0), lut.stride(0), BLOCK_NK=block,
                              num_warps=4 if block <= 1024 else 8)
    return lut


SELECTS = ("torch", "triton")  # sla_block_map(select=...)


def sla_block_map(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int = 128, block_k: int = 64,
                  select: str = "torch") -> BlockMap:
    """Block map of SLA for q, k (B, H, L, D); same result as `sla_block_map_reference`.

    Smoothing is applied after pooling: mean-pooling is linear, so pool(K - mean K) =
    pool(K) - mean K, and mean K is the count-weighted mean of the block means -- no extra pass
    over K. Pooling runs in Triton on CUDA (and under TRITON_INTERPRET=1), torch otherwise.
    select: how the top-n key blocks are picked, "torch" (topk + sort; the default until the fused
    kernel is timed on a GPU) or "triton" (`topk_select`: the same set, ties to lower indices).
    """
    check_qk(q, k, topk, block_q, block_k)
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    pq = pool_blocks(q, block_q)  # (B, H, Nq, D) fp32
    pk = pool_blocks(k, block_k)  # (B, H, Nk, D) fp32
    Lk, Nk = k.shape[2], pk.shape[2]
    if Lk % block_k == 0:  # equal blocks: the plain mean of the block means (one launch)
        k_mean = pk.mean(dim=2, keepdim=True)  # (B, H, 1, D)
    else:  # the ragged last block weighs by its token count
        counts = torch.full((Nk, 1), float(block_k), device=k.device)
        counts[-1] = Lk - (Nk - 1) * block_k
        k_mean = (pk * counts).sum(dim=2, keepdim=True) / Lk
    return _select(pq, pk - k_mean, topk, block_q, block_k, q.shape[2], Lk, select, k_mean[:, :, 0].contiguous())
