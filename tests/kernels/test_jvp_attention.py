"""JVP flash attention: closed-form reference vs torch.func.jvp, Triton kernel (interpreter) vs
reference, the autograd.Function / sdpa_jvp module under torch.func.jvp, forward AD and backward.

Runs on the CPU interpreter (TRITON_INTERPRET=1, set in conftest); bf16 is GPU-only (the
interpreter's bf16 tl.dot is wrong) and is checked by tools/bench_jvp_attention.py.
Tolerances (kernel vs the fp32 reference; |O| <= ~2, |tO| <= ~5 on these randn inputs):
    float32 -> (atol 2e-5, rtol 1e-5): fp32 products ("ieee" dots) and fp32 accumulators on both
               sides; only the summation order and the online max rescaling differ (seen 1e-6)
    float16 -> (atol 5e-3, rtol 5e-3): O and tO are rounded to fp16 on output (half-ulp 1e-3 at
               |x| ~ 2-4) and P~, H~ are rounded to fp16 before the P~V, P~tV, H~V GEMMs
               (2^-11 relative each); seen 1e-3
Reference vs torch.func.jvp in float64: (atol 1e-5, rtol 1e-5), the reference computes in fp32.
"""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import turbo_infer.layers.jvp_attention  # noqa: F401  (registers "sdpa_jvp")
from turbo_infer.layers.attention import make_attention
from turbo_kernels.attention.jvp_attention import (attention_reference, flash_attention_lse, jvp_attention,
                                                   jvp_attention_reference, jvp_attention_tangent,
                                                   jvp_flash_attention)

TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (5e-3, 5e-3)}


def assert_close(got, ref, atol, rtol, what=""):
    """assert_close that also reports the worst mismatches (index, got, ref)."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(got))[:5]}"
    err = (got.double() - ref.double()).abs() - (atol + rtol * ref.double().abs())
    if (err > 0).any():
        worst = torch.topk(err.flatten(), min(5, err.numel())).indices
        rows = [(tuple(int(i) for i in torch.unravel_index(w, err.shape)), float(got.flatten()[w]),
                 float(ref.flatten()[w])) for w in worst]
        raise AssertionError(f"{what}: worst mismatches (index, got, ref): {rows}")


def plain_attention(q, k, v, scale=None):
    """softmax attention in plain differentiable torch ops (the torch.func.jvp oracle)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def make(B, H, Lq, Lk, D, Dv, dtype, tangents="qkv"):
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, Dv)
    tq = torch.randn_like(q) if "q" in tangents else None
    tk = torch.randn_like(k) if "k" in tangents else None
    tv = torch.randn_like(v) if "v" in tangents else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [cast(t) for t in (q, k, v, tq, tk, tv)]


# ---------------------------------------------------------------- reference vs torch.func.jvp
@pytest.mark.parametrize("tangents", ["qkv", "q", "kv", "v", ""])
@pytest.mark.parametrize("Lq,Lk,D,Dv", [(45, 45, 32, 32), (33, 7, 16, 24)])
def test_reference_matches_func_jvp(tangents, Lq, Lk, D, Dv):
    q, k, v, tq, tk, tv = make(2, 3, Lq, Lk, D, Dv, torch.float32, tangents)
    scale = 0.3
    o, to = jvp_attention_reference(q, k, v, tq, tk, tv, scale=scale)
    zeros = lambda t, p: torch.zeros_like(p) if t is None else t  # noqa: E731
    prim = tuple(t.double() for t in (q, k, v))
    tang = tuple(zeros(t, p).double() for t, p in zip((tq, tk, tv), (q, k, v)))
    ro, rto = torch.func.jvp(lambda a, b, c: plain_attention(a, b, c, scale), prim, tang)
    assert_close(o, ro, 1e-5, 1e-5, "O")
    assert_close(to, rto, 1e-5, 1e-5, "tO")
    if tangents == "":
        assert to.abs().max() == 0


def test_reference_matches_finite_differences():
    q, k, v, tq, tk, tv = (t.double() for t in make(1, 2, 20, 20, 16, 16, torch.float32))
    eps = 1e-4
    fd = (plain_attention(q + eps * tq, k + eps * tk, v + eps * tv)
          - plain_attention(q - eps * tq, k - eps * tk, v - eps * tv)) / (2 * eps)
    _, to = jvp_attention_reference(q.float(), k.float(), v.float(), tq.float(), tk.float(), tv.float())
    assert_close(to, fd, 1e-4, 1e-4, "tO vs finite differences")


# ---------------------------------------------------------------- Triton kernel vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Lq,Lk,D,Dv,bm,bn", [
    (45, 45, 32, 32, 16, 16),   # ragged query and key tails, 3 x 3 blocks
    (45, 45, 32, 32, 32, 16),
    (45, 19, 32, 32, 16, 32),   # cross-attention lengths, a single ragged key block
    (17, 40, 24, 40, 16, 16),   # head dims that are not powers of two (masked d columns)
    (32, 64, 16, 16, 16, 32),   # everything divides: the unmasked path alone
])
def test_fused_kernel_matches_reference(dtype, Lq, Lk, D, Dv, bm, bn):
    q, k, v, tq, tk, tv = make(2, 2, Lq, Lk, D, Dv, dtype)
    o, to = jvp_attention(q, k, v, tq, tk, tv, block_m=bm, block_n=bn)
    ro, rto = jvp_attention_reference(q, k, v, tq, tk, tv)
    atol, rtol = TOL[dtype]
    assert o.dtype == to.dtype == dtype
    assert_close(o, ro, atol, rtol, "O")
    assert_close(to, rto, atol, rtol, "tO")


@pytest.mark.parametrize("tangents", ["q", "k", "v", "qv", ""])
def test_fused_kernel_partial_tangents(tangents):
    # cross-attention in rCM: the text K/V are constants, tK = tV = None (no GEMMs spent on them)
    q, k, v, tq, tk, tv = make(1, 2, 45, 21, 32, 32, torch.float32, tangents)
    o, to = jvp_attention(q, k, v, tq, tk, tv, block_m=16, block_n=16)
    ro, rto = jvp_attention_reference(q, k, v, tq, tk, tv)
    assert_close(o, ro, *TOL[torch.float32], "O")
    assert_close(to, rto, *TOL[torch.float32], "tO")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_running_max_rescaling_and_no_nan(dtype):
    # large, growing logits along the keys: the running max changes in every block, so every
    # accumulator (O~, T~, l, r) must be rescaled correctly; exp would overflow without the max
    q, k, v, tq, tk, tv = make(1, 2, 45, 45, 32, 32, dtype)
    k = (k.float() * torch.linspace(0.5, 4.0, 45)[:, None]).to(dtype)
    q = (q.float() * 3).to(dtype)
    o, to = jvp_attention(q, k, v, tq, tk, tv, block_m=16, block_n=16)
    ro, rto = jvp_attention_reference(q, k, v, tq, tk, tv)
    atol, rtol = TOL[dtype]
    assert_close(o, ro, atol, rtol, "O")
    # tO scales with |tS| ~ 3 * 4 * sqrt(D) * scale here: allow 4x the table's atol in fp16
    assert_close(to, rto, atol * (4 if dtype == torch.float16 else 1), rtol, "tO")


def test_every_output_element_is_written(monkeypatch):
    # poison every buffer the launcher allocates: an unwritten (ragged) row would stay NaN
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    q, k, v, tq, tk, tv = make(1, 2, 45, 45, 32, 32, torch.float32)
    o, to = jvp_attention(q, k, v, tq, tk, tv, block_m=32, block_n=16)
    o2, lse = flash_attention_lse(q, k, v, block_m=32, block_n=16)
    to2 = jvp_attention_tangent(q, k, v, o2, lse, tq, tk, tv, block_m=32, block_n=16)
    for name, t in (("O", o), ("tO", to), ("O fwd", o2), ("LSE", lse), ("tO tangent", to2)):
        assert torch.isfinite(t).all(), name


def test_tiles_step_down_when_they_do_not_fit(monkeypatch):
    # a GPU with less shared memory raises OutOfResources at load for big tiles: the launcher steps
    # down (stages, then BLOCK_N, then BLOCK_M), remembers what fitted and still gives exact results
    import turbo_kernels.attention.jvp_attention as mod
    from triton.runtime.errors import OutOfResources
    real, tried = mod._jvp_attn_fwd_kernel, []

    class Picky:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                tried.append((meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]))
                if meta["num_stages"] > 1 or meta["BLOCK_N"] > 16:
                    raise OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(mod, "_jvp_attn_fwd_kernel", Picky())
    monkeypatch.setattr(mod, "_FITTED", {})
    q, k, v, tq, tk, tv = make(1, 2, 45, 45, 32, 32, torch.float32)
    o, to = jvp_attention(q, k, v, tq, tk, tv, block_m=32, block_n=64, num_stages=2)
    assert tried == [(32, 64, 4, 2), (32, 64, 4, 1), (32, 32, 4, 1), (32, 16, 4, 1)]
    assert mod.fitted_tiles("fused", (32, 64, 4, 2)) == {(32, 16, 4, 1)}
    ro, rto = jvp_attention_reference(q, k, v, tq, tk, tv)
    assert_close(to, rto, *TOL[torch.float32], "tO")
    tried.clear()
    jvp_attention(q, k, v, tq, tk, tv, block_m=32, block_n=64, num_stages=2)
    assert tried == [(32, 16, 4, 1)]  # remembered: no second round of failures


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_lse_and_tangent_from_stats(dtype):
    q, k, v, tq, tk, tv = make(2, 2, 45, 38, 32, 32, dtype)
    scale = 0.2
    o, lse = flash_attention_lse(q, k, v, scale=scale, block_m=16, block_n=16)
    ro, rto = jvp_attention_reference(q, k, v, tq, tk, tv, scale=scale)
    rlse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
    atol, rtol = TOL[dtype]
    assert_close(o, ro, atol, rtol, "O")
    assert_close(lse, rlse, 1e-5, 1e-5, "LSE")  # fp32 statistics in both dtypes
    to = jvp_attention_tangent(q, k, v, o, lse, tq, tk, tv, scale=scale, block_m=32, block_n=16)
    assert_close(to, rto, atol, rtol, "tO")


def test_noncontiguous_layouts():
    # (B, L, H, D) buffers viewed as (B, H, L, D), as the DiT produces them
    q, k, v, tq, tk, tv = (t.transpose(1, 2) for t in (torch.randn(1, 45, 2, 32) for _ in range(6)))
    o, to = jvp_attention(q, k, v, tq, tk, tv, block_m=16, block_n=16)
    ro, rto = jvp_attention_reference(q, k, v, tq, tk, tv)
    assert_close(o, ro, *TOL[torch.float32], "O")
    assert_close(to, rto, *TOL[torch.float32], "tO")


# ---------------------------------------------------------------- autograd.Function and module
class TinyBlock(torch.nn.Module):
    """x -> self-attention(x) + cross-attention(x, ctx): the shape of a DiT block's attention."""

    def __init__(self, attn, dim=64, heads=2):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.q2 = torch.nn.Linear(dim, dim)
        self.kv2 = torch.nn.Linear(dim, 2 * dim)

    def split(self, x):  # (B, L, H*D) -> (B, H, L, D)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, ctx):
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        x = x + self.attn(q, k, v).transpose(1, 2).flatten(2)
        k2, v2 = (self.split(t) for t in self.kv2(ctx).chunk(2, dim=-1))  # constants under the JVP
        return x + self.attn(self.split(self.q2(x)), k2, v2).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("triton_path", [True, False])
def test_module_under_func_jvp(triton_path, monkeypatch):
    if not triton_path:
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU fallback: SDPA on the math backend
    block = TinyBlock(make_attention("sdpa_jvp", 32, block_m=16, block_n=16))
    ref_block = TinyBlock(lambda q, k, v: plain_attention(q, k, v))
    ref_block.load_state_dict(block.state_dict())
    x, ctx, tx = torch.randn(2, 45, 64), torch.randn(2, 19, 64), torch.randn(2, 45, 64)
    with torch.no_grad():  # rCM's JVP pass runs without grad
        out, tout = torch.func.jvp(lambda a: block(a, ctx), (x,), (tx,))
    ref_block.double()
    rout, rtout = torch.func.jvp(lambda a: ref_block(a, ctx.double()), (x.double(),), (tx.double(),))
    assert_close(out, rout, 1e-4, 1e-4, "output")
    assert_close(tout, rtout, 1e-4, 1e-4, "tangent")


def test_function_under_forward_ad_and_func_jvp():
    q, k, v, tq, tk, tv = make(1, 2, 45, 45, 32, 32, torch.float32)
    _, rto = jvp_attention_reference(q, k, v, tq, None, tv)
    with fwAD.dual_level():
        out = jvp_flash_attention(fwAD.make_dual(q, tq), k, fwAD.make_dual(v, tv), block_m=16, block_n=16)
        to = fwAD.unpack_dual(out).tangent
    assert_close(to, rto, *TOL[torch.float32], "forward AD tO")
    _, to = torch.func.jvp(lambda a, c: jvp_flash_attention(a, k, c, block_m=16, block_n=16), (q, v), (tq, tv))
    assert_close(to, rto, *TOL[torch.float32], "func.jvp tO")


@pytest.mark.parametrize("needs_grad,tangents,modes", [
    (False, True, ["fused"]),   # rCM's no-grad JVP pass: one fused pass on the unpacked duals
    (False, False, []),         # inference: plain SDPA, no Triton launch
    (True, True, ["fused"]),    # grad needed: JVPAttentionFunction, SDPA forward, fused kernel in jvp
])
def test_dispatch_of_jvp_flash_attention(needs_grad, tangents, modes, monkeypatch):
    import turbo_kernels.attention.jvp_attention as mod
    seen, real_launch = [], mod._launch
    monkeypatch.setattr(mod, "_launch", lambda mode, *a, **kw: seen.append(mode) or real_launch(mode, *a, **kw))
    q, k, v, tq, tk, tv = make(1, 2, 45, 45, 32, 32, torch.float32)
    w = torch.ones((), requires_grad=needs_grad)
    f = lambda a, b, c: jvp_flash_attention(a * w, b, c, block_m=16, block_n=16)  # noqa: E731
    if tangents:
        o, to = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
        assert_close(to, jvp_attention_reference(q, k, v, tq, tk, tv)[1], *TOL[torch.float32], "tO")
    else:
        with torch.no_grad():
            o = f(q, k, v)
    assert seen == modes
    assert_close(o, attention_reference(q, k, v), *TOL[torch.float32], "O")


def test_training_forward_uses_sdpa_autograd_without_a_second_forward(monkeypatch):
    # grads needed, no tangents (rCM's student / fake-score steps): SDPA's own autograd; its backward
    # reuses the saved O and LSE, so no attention forward runs during backward (the autograd.Function's
    # backward would run SDPA once more)
    import turbo_kernels.attention.jvp_attention as mod
    seen, real_launch = [], mod._launch
    monkeypatch.setattr(mod, "_launch", lambda mode, *a, **kw: seen.append(mode) or real_launch(mode, *a, **kw))
    q, k, v, _, _, _ = make(1, 2, 45, 19, 32, 32, torch.float32)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    o = jvp_flash_attention(*ours, block_m=16, block_n=16)
    assert "JVPAttentionFunction" not in type(o.grad_fn).__name__
    calls, real_sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real_sdpa(*a, **kw))
    grad = torch.randn_like(o)
    o.backward(grad)
    assert calls == [] and seen == []
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    plain_attention(*ref).backward(grad)
    for name, a, b in zip("qkv", ours, ref):
        assert_close(a.grad, b.grad, *TOL[torch.float32], f"d{name}")


def test_function_forward_lse_then_tangent_kernel(monkeypatch):
    # the autograd.Function applied directly without grad: Triton forward with LSE, then the
    # 5-GEMM tangent kernel in its jvp rule
    import turbo_kernels.attention.jvp_attention as mod
    seen, real_launch = [], mod._launch
    monkeypatch.setattr(mod, "_launch", lambda mode, *a, **kw: seen.append(mode) or real_launch(mode, *a, **kw))
    q, k, v, tq, tk, tv = make(1, 2, 45, 45, 32, 32, torch.float32)
    tiles = dict(block_m=16, block_n=16)
    o, to = torch.func.jvp(lambda a, b, c: mod.JVPAttentionFunction.apply(a, b, c, 32 ** -0.5, tiles)[0],
                           (q, k, v), (tq, tk, tv))
    assert seen == ["fwd", "tangent"]
    ro, rto = jvp_attention_reference(q, k, v, tq, tk, tv)
    assert_close(o, ro, *TOL[torch.float32], "O")
    assert_close(to, rto, *TOL[torch.float32], "tO")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_sdpa_and_reference(dtype):
    q, k, v, _, _, _ = make(2, 2, 45, 19, 32, 32, dtype)
    grad = torch.randn(2, 2, 45, 32, dtype=dtype)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.float().clone().requires_grad_() for t in (q, k, v)]
    o = jvp_flash_attention(*ours, block_m=16, block_n=16)
    o.backward(grad)
    with sdpa_kernel([SDPBackend.MATH]):
        F.scaled_dot_product_attention(*sdpa).backward(grad)
    plain_attention(*ref).backward(grad.float())
    atol, rtol = TOL[dtype]
    assert_close(o, attention_reference(q, k, v), atol, rtol, "O")
    for name, a, b, c in zip("qkv", ours, sdpa, ref):
        assert_close(a.grad, b.grad, atol, rtol, f"d{name} vs SDPA")
        assert_close(a.grad, c.grad, 2 * atol, 2 * rtol, f"d{name} vs fp32 reference")


def test_backward_only_requested_inputs():
    q, k, v, _, _, _ = make(1, 2, 20, 20, 16, 16, torch.float32)
    q.requires_grad_()
    jvp_flash_attention(q, k, v).sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None


def test_fallback_without_interpreter_matches_sdpa(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, tq, tk, tv = make(1, 2, 45, 45, 32, 32, torch.float32)
    attn = make_attention("sdpa_jvp", 32)
    assert_close(attn(q, k, v), F.scaled_dot_product_attention(q, k, v), 1e-6, 1e-6, "O")
    o, to = jvp_attention(q, k, v, tq, tk, tv)  # the functional form falls back to the reference
    assert_close(to, jvp_attention_reference(q, k, v, tq, tk, tv)[1], 1e-6, 1e-6, "tO")


# ---------------------------------------------------------------- bad input
def test_errors_name_the_argument():
    q, k, v, tq, tk, tv = make(1, 2, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="q must have shape"):
        jvp_attention(q[0], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        jvp_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        jvp_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        jvp_attention(q, [1], v)
    with pytest.raises(ValueError, match="k must have head dim"):
        jvp_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="v must have the sequence length"):
        jvp_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="k and v must have batch and heads"):
        jvp_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="at least one key"):
        jvp_attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="tq must have the shape"):
        jvp_attention(q, k, v, tq[:, :, :4])
    with pytest.raises(TypeError, match="tv must have the dtype"):
        jvp_attention(q, k, v, tq, tk, tv.half())
    with pytest.raises(TypeError, match="tk must be a torch.Tensor or None"):
        jvp_attention(q, k, v, tq, 3.0)
    with pytest.raises(ValueError, match="scale must be"):
        jvp_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        jvp_attention(q, k, v, tq, block_m=24)
    with pytest.raises(ValueError, match="lse must be"):
        jvp_attention_tangent(q, k, v, q, torch.zeros(1, 2, 7), tq)
    with pytest.raises(ValueError, match="head_dim must be"):
        make_attention("sdpa_jvp", 0)
    with pytest.raises(ValueError, match="unknown tile options"):
        make_attention("sdpa_jvp", 16, block_q=64)
    with pytest.raises(ValueError, match="q must have head dim 32"):
        make_attention("sdpa_jvp", 32)(q, k, v)
