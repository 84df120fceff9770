"""Shared launch helpers for the Triton kernels in turbo_kernels.

Small, dependency-free utilities that every kernel file uses the same way: whether a tensor
should go through Triton at all (CUDA, or CPU under the interpreter), ceil-division, powers of
two for tile shapes, and argument checks that raise errors naming the argument.
"""
from __future__ import annotations

import os

import torch

try:  # host-side tensor descriptors (Triton >= 3.4); without them every kernel keeps its pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no Triton (CPU-only install) or an older one
    TensorDescriptor = None


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether kernels should be launched for these tensors.

    CUDA tensors always go through Triton; CPU tensors only when the interpreter is on (tests).
    Otherwise callers fall back to their pure-torch reference.
    """
    if all(t.is_cuda for t in tensors):
        return True
    return all(t.device.type == "cpu" for t in tensors) and interpreter_enabled()


def descriptors_supported(t: torch.Tensor) -> bool:
    """Whether kernels may fetch t's tiles through Triton tensor descriptors: on the interpreter (tests), or on a
    GPU with the bulk tensor copy engine (compute capability 9.0+; the variants were only ever timed there).
    Older GPUs (the a100 and rtx4090 targets) and Triton builds without descriptors keep the pointer kernels."""
    if TensorDescriptor is None:
        return False
    if t.device.type == "cpu":
        return interpreter_enabled()
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def smem_per_block(device) -> int:
    """The most shared memory (bytes) a block may opt into on this CUDA device; where torch does not report it, by
    compute capability (the sm_90 / sm_100 data-center parts 227 KiB, the others taken as 99 KiB, an RTX 4090's /
    5090's). Kernel configurations sized for an H100 check against it before launching."""
    props = torch.cuda.get_device_properties(device)
    for name in ("shared_memory_per_block_optin", "shared_memory_per_multiprocessor"):
        value = getattr(props, name, None)
        if value:
            return int(value)
    return 232_448 if props.major in (9, 10) else 101_376


def token_major(t: torch.Tensor) -> bool:
    """Whether t (B, H, L, D) is the per-head view t.transpose(1, 2) of contiguous (B, L, H, D) tokens (the
    DiT's layout after its q/k/v projections)."""
    B, H, L, D = t.shape
    return H > 1 and L > 1 and t.stride() == (L * H * D, D, H * D, 1)


def heads_output_like(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty attention output for q (B, H, L, D), token-major (`token_major`) when q is: then the model's
    o.transpose(1, 2).reshape(B, L, H·D) is a view, not a copy. Any other q gets a contiguous (B, H, L, D)
    output. Kernels take the output's strides; the runtime's custom ops and their fake implementations
    both allocate through this, so compiled graphs see the real strides."""
    B, H, L, D = q.shape
    dtype = q.dtype if dtype is None else dtype
    if token_major(q):
        return q.new_empty((B, L, H, D), dtype=dtype).transpose(1, 2)
    return q.new_empty((B, H, L, D), dtype=dtype)


def as_heads_output(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out (B, H, L, D) in `heads_output_like(q)`'s layout: out itself when it has it, else a copy."""
    if (token_major(out) if token_major(q) else out.is_contiguous()):
        return out
    return heads_output_like(q, out.dtype).copy_(out)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def is_power_of_2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def check_float_dtype(name: str, t: torch.Tensor, allowed=(torch.float16, torch.bfloat16, torch.float32)) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_block(name: str, value: int, minimum: int = 16) -> None:
    """Tile sizes must be powers of two >= minimum (tl.arange and tl.dot need it)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or not is_power_of_2(value):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")
