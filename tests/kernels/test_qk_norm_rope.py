"""Fused q/k RMSNorm + RoPE: the Triton kernel (CPU interpreter) vs its torch reference, and the
reference vs the model's eager path (turbo_infer RMSNorm, then RoPE3D.rotate).

Tolerances:
    float32 kernel vs reference: (1e-5, 1e-5)  same fp32 arithmetic, only the order of the row's sum
                                               of squares differs (~1e-7 observed).
    float16 / bfloat16 kernel vs reference: both round once from the same fp32 values: at most one
                                               unit in the last place apart, (1e-3, 8e-3) for fp16 and
                                               (1e-2, 1.6e-2) for bf16 on O(1) outputs.
    reference vs eager model path in bf16: the eager path also rounds the norm's output to bf16
                                               before rotating (module docstring): two roundings, at
                                               most ~2 ulp, (2e-2, 3.2e-2).
Elementwise kernels only: no tl.dot, so bf16 runs correctly in the interpreter.
"""
import pytest
import torch

from turbo_kernels.attention.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 8e-3), torch.bfloat16: (1e-2, 1.6e-2)}


def make(B, L, H, D, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, H * D, generator=g) * scale).to(dtype)
    w = (1 + 0.3 * torch.randn(H * D, generator=g)).to(dtype)
    ang = torch.rand(L, D // 2, generator=g) * 6.3
    return x, w, ang.cos(), ang.sin()


@pytest.mark.parametrize("split", [False, True], ids=["stride2", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L,H,D", [(1, 7, 2, 8), (2, 13, 3, 10), (1, 1, 1, 2)])  # odd L, non-power-of-2 C, one token
def test_kernel_matches_reference(dtype, B, L, H, D, split):
    """Both ways of reaching the channel pairs (stride-2 accesses, or contiguous tiles split in registers)."""
    x, w, cos, sin = make(B, L, H, D, dtype)
    got = qk_norm_rope(x, w, cos, sin, H, eps=1e-6, split=split)
    ref = qk_norm_rope_reference(x, w, cos, sin, H, eps=1e-6)
    assert got.shape == (B, L, H, D) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_strided_rows_and_zero_rows():
    x, w, cos, sin = make(2, 5, 2, 8, torch.float32)
    wide = torch.zeros(2, 5, 24)
    wide[..., 4:20] = x  # x as a non-contiguous slice of a wider tensor
    assert not wide[..., 4:20].is_contiguous()
    for split in (False, True):
        torch.testing.assert_close(qk_norm_rope(wide[..., 4:20], w, cos, sin, 2, split=split),
                                   qk_norm_rope_reference(x, w, cos, sin, 2))
    zero = torch.zeros(1, 3, 16)
    out = qk_norm_rope(zero, w, cos[:3], sin[:3], 2)
    assert torch.equal(out, torch.zeros(1, 3, 2, 8))  # rsqrt(0 + eps) * 0: no NaN
    assert qk_norm_rope(torch.zeros(0, 5, 16), w, cos, sin, 2).shape == (0, 5, 2, 8)


def test_reference_is_the_models_eager_path():
    from turbo_infer.models.wan import RMSNorm, RoPE3D

    H, D = 3, 12
    x, w, _, _ = make(2, 4 * 5 * 6, H, D, torch.bfloat16)
    cos, sin = RoPE3D(D).freqs((4, 5, 6), torch.device("cpu"))
    norm = RMSNorm(H * D, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w)
    eager = RoPE3D.rotate(norm(x).view(2, -1, H, D), cos, sin)
    torch.testing.assert_close(qk_norm_rope_reference(x, w, cos, sin, H, eps=1e-6), eager, atol=2e-2, rtol=3.2e-2)
    torch.testing.assert_close(qk_norm_rope_reference(x.float(), w.float(), cos, sin, H, eps=1e-6),
                               RoPE3D.rotate(norm.float()(x.float()).view(2, -1, H, D), cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(num_heads=4), "num_heads"),          # 4 does not divide 30 channels
    (dict(num_heads=10), "even"),              # head dim 3
    (dict(weight=torch.ones(29)), "weight"),
    (dict(cos=torch.ones(4, 3)), "cos"),
    (dict(x=torch.ones(2, 30)), r"\(B, L, C\)"),
    (dict(x=torch.ones(1, 5, 30, dtype=torch.int32)), "x"),
])
def test_errors_name_the_argument(bad, match):
    args = dict(x=torch.ones(1, 5, 30), weight=torch.ones(30), cos=torch.ones(5, 3), sin=torch.ones(5, 3), num_heads=5)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        qk_norm_rope(**args)


def test_the_kernel_runs_not_the_reference(monkeypatch):
    import turbo_kernels.attention.qk_norm_rope as mod

    x, w, cos, sin = make(1, 3, 2, 4, torch.float32)
    ref = mod.qk_norm_rope_reference(x, w, cos, sin, 2)
    monkeypatch.setattr(mod, "qk_norm_rope_reference", lambda *a, **k: pytest.fail("fell back to the reference"))
    torch.testing.assert_close(mod.qk_norm_rope(x, w, cos, sin, 2), ref)
