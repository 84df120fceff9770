"""The `sage` and `sagesla` attention backends (turbo_infer.layers.lowbit_attention) on CPU.

On CPU tensors the modules run the torch references, which tests/kernels/test_lowbit.py ties to
the Triton kernels. Bounds: as in test_lowbit.py, fp8 PV gives cos ≥ 0.999 against exact attention;
sagesla's linear branch and proj_l are SLA's own (identical code), so with the same block map
sagesla − sla = (low-bit − exact) sparse branch, bounded the same way.
"""
import pytest
import torch
import torch.nn.functional as F

from turbo_infer.layers.attention import available_attention, make_attention
from turbo_infer.layers.lowbit_attention import SageAttention, SageSparseLinearAttention
from turbo_infer.layers.sla import SparseLinearAttention


def cos(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def qkv(L=300, D=32, H=2, dtype=torch.float32):
    return tuple(torch.randn(1, H, L, D, dtype=dtype) for _ in range(3))


def test_registered():
    assert {"sage", "sagesla"} <= set(available_attention())
    assert isinstance(make_attention("sage", 32), SageAttention)
    m = make_attention("sagesla", 32, topk=0.2, block_q=64, block_k=32)
    assert isinstance(m, SageSparseLinearAttention) and isinstance(m, SparseLinearAttention)
    assert m.topk == 0.2 and (m.block_q, m.block_k) == (64, 32)


@pytest.mark.parametrize("pv,bound", [(None, 0.999), ("fp8", 0.999), ("fp16", 0.9998)])
def test_sage_close_to_sdpa(pv, bound):
    q, k, v = qkv()
    out = make_attention("sage", 32, pv=pv)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert cos(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double())) >= bound


def test_sage_bf16_in_bf16_out():
    q, k, v = qkv(L=100, dtype=torch.bfloat16)
    out = make_attention("sage", 32)(q, k, v)
    assert out.dtype == torch.bfloat16
    assert cos(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double())) >= 0.998


def test_sagesla_matches_sla_structure():
    q, k, v = qkv(L=256, D=32)
    sla = SparseLinearAttention(32, topk=0.25, block_q=64, block_k=32)
    sage = SageSparseLinearAttention(32, topk=0.25, block_q=64, block_k=32)
    assert sage.proj_l.weight.dtype == torch.float32 and not sage.proj_l.weight.any()  # zero-init, fp32
    with torch.no_grad():  # same non-zero proj_l in both: the linear branch contributes
        w, b = torch.randn(32, 32) / 32 ** 0.5, 0.1 * torch.randn(32)
        for m in (sla, sage):
            m.proj_l.weight.copy_(w)
            m.proj_l.bias.copy_(b)
    assert cos(sage(q, k, v), sla(q, k, v)) >= 0.999
    full = SageSparseLinearAttention(32, topk=1.0, block_q=64, block_k=32)  # every block critical: dense
    assert cos(full(q, k, v), F.scaled_dot_product_attention(q.double(), k.double(), v.double())) >= 0.999


def test_proj_l_stays_fp32_and_state_dict():
    m = SageSparseLinearAttention(32).to(torch.bfloat16)
    assert m.proj_l.weight.dtype == torch.float32
    assert set(m.state_dict()) == {"proj_l.weight", "proj_l.bias"}  # same keys as `sla`: bundles interchange


def test_bad_options():
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        SageAttention(48)
    with pytest.raises(ValueError, match="pv must be None"):
        SageAttention(32, pv="int4")
    with pytest.raises(ValueError, match="block_q must be <= 128"):
        SageSparseLinearAttention(32, block_q=256)
    with pytest.raises(ValueError, match="topk must be"):
        SageSparseLinearAttention(32, topk=0.0)
    q, k, v = qkv(L=16, D=64)
    with pytest.raises(ValueError, match="head dim 64"):
        SageAttention(32)(q, k, v)
