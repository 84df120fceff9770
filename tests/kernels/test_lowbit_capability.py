"""Capability dispatch: the compute-capability → kernels table, and the CPU answer."""
import pytest
import torch

from turbo_kernels.capability import Capabilities, capabilities_for, kernel_support


@pytest.mark.parametrize("cc,int8,fp8", [
    ((7, 5), False, False),  # Turing: references only
    ((8, 0), True, False),  # A100: int8 GEMM / QKᵀ, fp16 PV
    ((8, 6), True, False),
    ((8, 9), True, True),  # Ada (RTX 4090): fp8 tensor cores
    ((9, 0), True, True),  # Hopper
    ((10, 0), True, True),  # Blackwell datacenter
    ((12, 0), True, True),  # Blackwell consumer (RTX 5090)
])
def test_table(cc, int8, fp8):
    cap = capabilities_for(cc)
    assert (cap.int8_gemm, cap.int8_attention, cap.fp8_gemm, cap.fp8_pv) == (int8, int8, fp8, fp8)
    assert cap.triton and cap.compute_capability == cc
    assert cap.attention_pv == ("fp8" if fp8 else "fp16")
    assert cap.linear_modes() == ("bf16",) + (("int8",) if int8 else ()) + (("fp8",) if fp8 else ())


def test_without_triton_nothing_runs():
    cap = capabilities_for((9, 0), triton_available=False)
    assert not (cap.triton or cap.int8_gemm or cap.fp8_gemm or cap.int8_attention or cap.fp8_pv)


def test_cpu_uses_references():
    cap = kernel_support("cpu")
    assert isinstance(cap, Capabilities) and cap.device_type == "cpu" and cap.compute_capability is None
    assert not (cap.triton or cap.int8_gemm or cap.fp8_gemm or cap.int8_attention or cap.fp8_pv)
    assert cap.linear_modes() == ("bf16",)
    assert kernel_support(torch.device("cpu")) == cap
    if not torch.cuda.is_available():
        assert kernel_support() == cap


def test_bad_device_and_cc():
    with pytest.raises(ValueError, match="device must be"):
        kernel_support("not-a-device")
    with pytest.raises(TypeError, match="compute_capability must be a pair of ints"):
        capabilities_for(("9", 0))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            kernel_support("cuda")
