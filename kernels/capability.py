"""Which low-bit kernels can run on a device: the one capability table the runtime consults.

    compute capability   int8 GEMM / int8 QKᵀ   fp8 GEMM / fp8 PV   notes
    < 8.0 (Volta/Turing)  no                     no                  references only
    8.0, 8.6, 8.7 (Ampere) yes                   no                  PV in fp16
    8.9 (Ada), 9.0 (Hopper), 10.x, 12.x (Blackwell) yes             yes
    CPU                   no                     no                  torch references (emulate the math)

fp8 tensor cores arrived with sm89; int8 mma.sync with sm80 (sm75 has int8 too, but the kernels
are tuned and tested for sm80+ only). Triton must import for any kernel to run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MIN_ARCH = (8, 9)  # Ada: first fp8 tensor cores
INT8_MIN_ARCH = (8, 0)


@dataclass(frozen=True)
class Capabilities:
    """What this device can run. All False on CPU: callers use the torch references."""

    device_type: str
    compute_capability: tuple[int, int] | None
    triton: bool  # Triton imports and the device is a CUDA GPU it can target
    int8_gemm: bool  # W8A8 int8 GEMM (turbo_kernels.gemm.w8a8)
    fp8_gemm: bool  # W8A8 fp8 GEMM (Triton or torch._scaled_mm)
    int8_attention: bool  # INT8 QKᵀ attention kernels (sage, sagesla)
    fp8_pv: bool  # fp8 e4m3 PV product inside attention (else fp16)

    @property
    def attention_pv(self) -> str:
        """The PV format the low-bit attention kernels should use here."""
        return "fp8" if self.fp8_pv else "fp16"

    def linear_modes(self) -> tuple[str, ...]:
        """Linear precisions a bundle may use on this device."""
        return ("bf16",) + (("int8",) if self.int8_gemm else ()) + (("fp8",) if self.fp8_gemm else ())


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def capabilities_for(compute_capability: tuple[int, int] | None, *, triton_available: bool = True,
                     device_type: str = "cuda") -> Capabilities:
    """The table above as a pure function (testable without a GPU). None = CPU."""
    if compute_capability is None or device_type != "cuda":
        return Capabilities("cpu" if device_type == "cuda" else device_type, None, False, False, False, False, False)
    major, minor = compute_capability
    if not isinstance(major, int) or not isinstance(minor, int):
        raise TypeError(f"compute_capability must be a pair of ints, got {compute_capability!r}")
    int8 = triton_available and (major, minor) >= INT8_MIN_ARCH
    fp8 = triton_available and (major, minor) >= FP8_MIN_ARCH
    return Capabilities(device_type, (major, minor), triton_available, int8, fp8, int8, fp8)


def kernel_support(device: "torch.device | str | int | None" = None) -> Capabilities:
    """Capabilities of `device` (default: the current CUDA device if there is one, else CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        device = torch.device("cuda", device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device, a device string or a CUDA index; got {device!r}") from e
    if device.type != "cuda":
        return capabilities_for(None, device_type=device.type)
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    return capabilities_for(torch.cuda.get_device_capability(device), triton_available=_triton_available())


__all__ = ["Capabilities", "capabilities_for", "kernel_support"]
