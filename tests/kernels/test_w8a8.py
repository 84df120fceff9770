"""W8A8 kernels: activation quantization, the int8/fp8 GEMM with fused epilogues, fused norm+quant.

Kernels run on the CPU interpreter (TRITON_INTERPRET=1). int8 tl.dot is exact there and fp8
tl.dot is exact per product (fp8×fp8 fits fp32) with fp32 sums; the fp32→fp8 cast is made exact
by `round_to_fp8_grid`. Tolerances of kernel vs reference, and why:
    quantizers (int8/fp8 values, fp32 scales): bit-exact (same fp32 operations, IEEE division).
    int8 GEMM (fp32 out): ≤ 1e-6 relative: exact int32 accumulators, same epilogue order.
    fp8 GEMM (fp32 out):  ≤ 1e-5 relative: fp32 summation order of ≤ K exact products (K·2⁻²⁴).
    bf16/fp16 outputs: one output ulp (2⁻⁷ / 2⁻¹⁰ relative): the interpreter truncates fp32→bf16
    where a GPU rounds to nearest (half an ulp).
    fused LayerNorm/RMSNorm: ≤ 0.1 % of the quantized values may differ by one step (rsqrt and
    the row sums are computed in a different order than torch's), none by more.
Error vs the float layer, from the quantization steps (Gaussian data, K ≥ 256):
    int8: per-token/per-channel step = amax/127 with amax ≈ 3.5–4σ; rounding error RMS
          step/√12 ≈ 0.9 % of σ per operand, √2 of that on the product: ≈ 1.3 % → bound 2e-2.
    fp8:  3 mantissa bits, relative RMS ≈ 2⁻⁴/√3·E[1/m] ≈ 2.6 % per operand → ≈ 3.7 % → bound 5e-2
          (DESIGN.md measured 3.7 %; the 2e-2 of the issue is below fp8 e4m3's resolution).
    int8 with outlier input channels (4 channels ×20): the row amax grows ~5×, so does every
          channel's step: measured ≈ 5 %; SmoothQuant factors (α = 0.5) bring it back to ≈ 1.5 %
          ≤ 2e-2 (see tests/infer/test_quant.py).
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from turbo_kernels.gemm import norm_quant as NQ
from turbo_kernels.gemm import quantize as Q
from turbo_kernels.gemm import w8a8 as W

# the pointer kernel at interpreter-sized tiles; the descriptor kernel (the default's tma=True) is tied to it bit for
# bit by test_gemm_tma_kernel_computes_what_the_pointer_kernel_does
def F_gelu(y):
    return torch.nn.functional.gelu(y, approximate="tanh")


SMALL = W.GemmConfig(block_m=32, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=1, tma=False)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def same_q(a, b):
    return torch.equal(a.float(), b.float())


# ----------------------------------------------------------------------------- activation quantization
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("static", [None, 0.02])
@pytest.mark.parametrize("shape,block_k", [((7, 300), None), ((3, 3000), 1024), ((3, 5000), None), ((1, 1), None)],
                         ids=["one-pass", "two-pass", "long-rows-default", "one-element"])
def test_quantize_rows_kernel_bitwise(mode, static, shape, block_k):
    x = (torch.randn(*shape) * 3).to(torch.bfloat16)
    if shape[0] > 2:
        x[2] = 0  # an all-zero row: scale 0, zeros
    got_q, got_s = Q.quantize_rows(x, mode, static, block_k=block_k)
    ref_q, ref_s = Q.quantize_rows_reference(x, mode, static)
    assert got_q.dtype == Q.QDTYPE[mode] and got_q.shape == x.shape
    assert same_q(got_q, ref_q) and torch.equal(got_s, ref_s)
    if static is None and shape[0] > 2:
        assert got_s[2] == 0 and not got_q[2].float().any()


def test_quantize_rows_smooth_and_shapes():
    x = torch.randn(2, 5, 40)  # (..., K) inputs flatten to (M, K)
    si = torch.rand(40) + 0.5
    for mode in ("int8", "fp8"):
        got_q, got_s = Q.quantize_rows(x, mode, smooth_inv=si)
        ref_q, ref_s = Q.quantize_rows_reference(x.reshape(10, 40), mode, smooth_inv=si)
        assert got_q.shape == (10, 40) and same_q(got_q, ref_q) and torch.equal(got_s, ref_s)
    q0, s0 = Q.quantize_rows(torch.randn(0, 16), "int8")  # no rows
    assert q0.shape == (0, 16) and s0.shape == (0,)


def test_quantization_step_and_saturation():
    x = torch.randn(64, 256)
    q, s = Q.quantize_rows_reference(x, "int8")
    assert ((Q.dequantize(q, s) - x).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()  # half a step
    assert (q.abs().amax(dim=1) == 127).all()  # each row's amax maps to ±127
    q, s = Q.quantize_rows_reference(x, "fp8")
    normal = x.abs() >= 2 ** -6 * s[:, None]
    assert ((Q.dequantize(q, s) - x).abs() <= 2 ** -4 * x.abs() + 1e-7)[normal].all()  # half an fp8 ulp
    q, s = Q.quantize_rows(torch.tensor([[1.0, -10.0, 0.05]]), "int8", static_scale=0.05)  # static: saturate
    assert q.tolist() == [[20, -127, 1]] and s.tolist() == [0.05000000074505806]
    q, _ = Q.quantize_rows(torch.tensor([[1000.0, -1000.0]]), "fp8", static_scale=1.0)
    assert q.float().tolist() == [[448.0, -448.0]]


def test_weight_quantization_per_channel():
    w = torch.randn(10, 33)
    w[3] = 0
    w[5] *= 100
    for mode in ("int8", "fp8"):
        w_q, w_s = Q.quantize_weight(w, mode)
        assert w_q.shape == w.shape and w_s.shape == (10,) and w_s[3] == 0
        assert torch.allclose(w_s[5] / w_s[0], w[5].abs().max() / w[0].abs().max())  # own scale per row
        step = w_s[:, None] if mode == "int8" else 2 ** -4 * w.abs() + 2 ** -9 * w_s[:, None]
        assert ((Q.dequantize(w_q, w_s) - w).abs() <= step * (1 + 1e-6)).all()


# ----------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M,K,N", [(37, 80, 50), (64, 64, 96), (1, 32, 8)], ids=["ragged-K", "even-K", "one-token"])
def test_gemm_kernel_matches_reference(mode, M, K, N):
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    xq, xs = Q.quantize_rows(x, mode)
    wq, ws = Q.quantize_weight(w, mode)
    got = W.w8a8_matmul(xq, xs, wq, ws, b, out_dtype=torch.float32, backend="triton", config=SMALL)
    ref = W.w8a8_matmul_reference(xq, xs, wq, ws, b, out_dtype=torch.float32)
    assert rel(got, ref) <= (1e-6 if mode == "int8" else 1e-5)
    # error vs the float layer: bounds derived in the module docstring
    f = F.linear(x.double(), w.double(), b.double())
    if K >= 64:
        assert rel(got, f) <= (2e-2 if mode == "int8" else 5e-2)
    # no bias, bf16 / fp16 outputs
    for dt in (torch.bfloat16, torch.float16):
        got = W.w8a8_matmul(xq, xs, wq, ws, None, out_dtype=dt, backend="triton", config=SMALL)
        ref = W.w8a8_matmul_reference(xq, xs, wq, ws, None, out_dtype=torch.float32)
        ulp = 2 ** -7 if dt == torch.bfloat16 else 2 ** -10
        assert got.dtype == dt and ((got.float() - ref).abs() <= ulp * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("persistent,warp_spec,flatten", [(False, False, False), (True, False, False),
                                                          (False, True, False), (True, False, True)],
                         ids=["one-tile", "persistent", "warp-specialized", "persistent-flattened"])
@pytest.mark.parametrize("M,K,N", [(37, 80, 50), (64, 64, 96), (1, 32, 8)], ids=["ragged-K", "even-K", "one-token"])
def test_gemm_tma_kernel_computes_what_the_pointer_kernel_does(mode, persistent, warp_spec, flatten, M, K, N):
    """tma=True: A and B tiles through tensor descriptors (zero-filled past M, N and K instead of wrapped and
    masked), one program per tile or a persistent grid (4 programs on the CPU) walking several tiles each (its tile
    and K loops flattened into one or not: a compiler hint the interpreter runs as written): the same products and
    epilogue as the pointer kernel, so the same result bit for bit, GELU + quantized output included. K = 80 is not
    a multiple of the 32-deep K tile: its last tile reads 16 columns past K as zeros."""
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    xq, xs = Q.quantize_rows(x, mode)
    wq, ws = Q.quantize_weight(w, mode)
    tma = replace(SMALL, tma=True, persistent=persistent, warp_spec=warp_spec, flatten=flatten)
    for kw in (dict(out_dtype=torch.float32), dict(activation="gelu_tanh", out_quant=mode, out_scale=0.01)):
        got = W.w8a8_matmul(xq, xs, wq, ws, b, backend="triton", config=tma, **kw)
        want = W.w8a8_matmul(xq, xs, wq, ws, b, backend="triton", config=SMALL, **kw)
        for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert g.dtype == r.dtype and torch.equal(g.float(), r.float())


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("subtile", [False, True], ids=["whole-tile", "two-halves"])
@pytest.mark.parametrize("M,K,N", [(37, 80, 96), (64, 64, 64)], ids=["ragged-M", "even"])
def test_gemm_descriptor_store_computes_what_the_pointer_stores_do(mode, subtile, M, K, N, monkeypatch):
    """store_desc: the descriptor kernel's plain outputs (float, or quantized with a static scale) leave through a
    tensor descriptor of the output, whole or as two half-width subtiles; rows past M are clipped by the store.
    The same tiles as the per-thread stores, bit for bit. A residual output keeps the pointer stores (two
    descriptors made, not three)."""
    made = []

    class Spy(W.TensorDescriptor):
        def __init__(self, *a, **k):
            made.append(k.get("block_shape"))
            super().__init__(*a, **k)
    monkeypatch.setattr(W, "TensorDescriptor", Spy)
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    xq, xs = Q.quantize_rows(x, mode)
    wq, ws = Q.quantize_weight(w, mode)
    flat = replace(SMALL, block_k=64, tma=True, persistent=True, flatten=True)  # no A / B descriptor looks like C's
    store = replace(flat, store_desc=True, store_subtile=subtile)
    for kw in (dict(out_dtype=torch.float32), dict(out_dtype=torch.float16, activation="gelu_tanh"),
               dict(activation="gelu_tanh", out_quant=mode, out_scale=0.01)):
        made.clear()
        got = W.w8a8_matmul(xq, xs, wq, ws, b, backend="triton", config=store, **kw)
        assert len(made) == 3 and [SMALL.block_m, SMALL.block_n // 2 if subtile else SMALL.block_n] in made
        want = W.w8a8_matmul(xq, xs, wq, ws, b, backend="triton", config=flat, **kw)
        for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert g.dtype == r.dtype and torch.equal(g.float(), r.float())
    made.clear()
    res = torch.randn(M, N)
    got = W.w8a8_matmul(xq, xs, wq, ws, b, backend="triton", config=store, out_dtype=torch.float32, residual=res)
    assert len(made) == 2
    want = W.w8a8_matmul(xq, xs, wq, ws, b, backend="triton", config=flat, out_dtype=torch.float32, residual=res)
    assert torch.equal(got, want)


def test_fp32_outputs_take_the_unflattened_loop(monkeypatch):
    """The flattened persistent loop's epilogue scratch sits beside its live pipeline stages; for an fp32 output tile
    that does not fit sm_90's shared memory (tools/kernel_resources.py, test_kernel_resources), so the launcher
    flattens only outputs of at most 2 bytes per element. Same result either way."""
    seen = []
    real = W._w8a8_gemm_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["FLATTEN"])
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(W, "_w8a8_gemm_tma_kernel", Spy())
    x, w = torch.randn(40, 64), torch.randn(48, 64) / 8
    xq, xs = Q.quantize_rows(x, "fp8")
    wq, ws = Q.quantize_weight(w, "fp8")
    flat = replace(SMALL, tma=True, persistent=True, flatten=True)
    for dt, want in ((torch.float32, False), (torch.float16, True)):
        got = W.w8a8_matmul(xq, xs, wq, ws, None, out_dtype=dt, backend="triton", config=flat)
        ref = W.w8a8_matmul(xq, xs, wq, ws, None, out_dtype=dt, backend="triton", config=SMALL)
        assert seen[-1] is want and torch.equal(got, ref)


def test_gemm_outlier_channels_error():
    x, w = torch.randn(64, 1536), torch.randn(128, 1536) / 1536 ** 0.5
    x[:, :4] *= 20
    f = x.double() @ w.double().t()
    for mode, bound in (("int8", 6e-2), ("fp8", 5e-2)):  # int8: ~5 % measured, see docstring
        xq, xs = Q.quantize_rows(x, mode)
        wq, ws = Q.quantize_weight(w, mode)
        assert rel(W.w8a8_matmul_reference(xq, xs, wq, ws, out_dtype=torch.float32), f) <= bound


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("out_quant", [None, "int8", "fp8"])
def test_gemm_gelu_and_static_quant_epilogue(mode, out_quant):
    M, K, N = 40, 64, 72
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    xq, xs = Q.quantize_rows(x, mode)
    wq, ws = Q.quantize_weight(w, mode)
    kw = dict(activation="gelu_tanh", out_quant=out_quant, out_scale=0.01 if out_quant else None)
    got = W.w8a8_matmul(xq, xs, wq, ws, b, out_dtype=torch.float32, backend="triton", config=SMALL, **kw)
    ref = W.w8a8_matmul_reference(xq, xs, wq, ws, b, out_dtype=torch.float32, **kw)
    if out_quant is None:
        assert rel(got, ref) <= 1e-5
        plain = W.w8a8_matmul_reference(xq, xs, wq, ws, b, out_dtype=torch.float32)
        assert torch.allclose(ref, F.gelu(plain, approximate="tanh"), atol=1e-5)  # the formula is GELU(tanh)
    else:
        assert got[0].dtype == Q.QDTYPE[out_quant] and (got[1] == ref[1]).all()
        mismatch = (got[0].float() != ref[0].float()).float().mean()
        assert mismatch <= 0.01  # exp() rounding can move a value across a rounding boundary
        assert (Q.dequantize(*got) - Q.dequantize(*ref)).abs().max() <= 2 * float(got[1][0]) * (
            1 if out_quant == "int8" else 32)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_gemm_group_scaled_output_feeds_a_group_scaled_gemm(mode, tma):
    """An up projection whose epilogue applies GELU and quantizes with dynamic scales per row and group of 32
    output columns (out_group), feeding a down projection whose K loop scales each 32-column step by those scales
    (x_scale (K // 32, M)): both kernels against the references (odd M, a ragged last tile of rows; N not a multiple
    of the 64-column tiles, so the padded columns must not enter a group's amax), the group scales equal to the
    reference's, and the pair against the float FFN (group scales: the int8 / fp8 error bounds of the module)."""
    M, K, F, N = 45, 64, 96, 40
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g)
    w1, b1 = torch.randn(F, K, generator=g) / K ** 0.5, 0.1 * torch.randn(F, generator=g)
    w2, b2 = torch.randn(N, F, generator=g) / F ** 0.5, 0.1 * torch.randn(N, generator=g)
    xq, xs = Q.quantize_rows(x, mode)
    w1q, w1s = Q.quantize_weight(w1, mode)
    w2q, w2s = Q.quantize_weight(w2, mode)
    up_cfg = W.GemmConfig(block_m=16, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=1, tma=tma)
    hq, hs = W.w8a8_matmul(xq, xs, w1q, w1s, b1, config=up_cfg, activation="gelu_tanh", out_quant=mode, out_group=32)
    rq, rs = W.w8a8_matmul_reference(xq, xs, w1q, w1s, b1, activation="gelu_tanh", out_quant=mode, out_group=32)
    assert hq.dtype == Q.QDTYPE[mode] and hs.shape == (F // 32, M) and hs.dtype == torch.float32
    torch.testing.assert_close(hs, rs, rtol=1e-6, atol=0)  # the same amax of the same fp32 values
    mismatch = (hq.float() != rq.float()).float().mean()
    assert mismatch <= 0.01  # exp() rounding can move a value across a rounding boundary
    hidden = W.w8a8_matmul_reference(xq, xs, w1q, w1s, b1, out_dtype=torch.float32, activation="gelu_tanh")
    step = hs.t().repeat_interleave(32, dim=1)  # each value's quantization step (int8) / scale (fp8)
    # int8: half a step of rounding; fp8 e4m3: 3 mantissa bits, half a unit in the last place ≤ 2^-4 of the value,
    # and at most half of the smallest subnormal step (2^-9 of the scale) below the normal range
    bound = 0.5 * step if mode == "int8" else hidden.abs() / 16 + step / 512
    assert ((Q.dequantize_groups(rq, rs) - hidden).abs() <= bound + 1e-6).all()
    down_cfg = W.GemmConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=1, tma=False)
    y = W.w8a8_matmul(rq, rs, w2q, w2s, b2, out_dtype=torch.float32, config=down_cfg)
    ref = W.w8a8_matmul_reference(rq, rs, w2q, w2s, b2, out_dtype=torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    assert W.a_group_of(rq, rs) == 32
    exact = F_gelu(x @ w1.t() + b1) @ w2.t() + b2
    err = ((ref - exact).norm() / exact.norm()).item()
    assert err < (0.02 if mode == "int8" else 0.06), err
    with pytest.raises(ValueError, match="must be a multiple of config.block_k"):
        W.w8a8_matmul(rq, rs, w2q, w2s, b2, config=replace(down_cfg, block_k=64))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M,gate_shape,gate_path", [(40, None, 0), (40, (72,), 1), (64, (2, 72), 1), (80, (2, 72), 2),
                                                    (40, (4, 72), 3)],
                         ids=["no-gate", "one-gate", "gate-rows-on-tile-edges", "two-gates-per-tile",
                              "four-gates-per-tile"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_gemm_gated_residual_epilogue(mode, M, gate_shape, gate_path, tma):
    """residual + gate·y in the epilogue: the reference's fp32 sum, then one rounding to the residual's dtype
    (bf16: the interpreter truncates where a GPU rounds, one ulp, as the module docstring says); a gate row
    per M // G output rows (a DiT batch of G videos, each its own gate). With 32-row tiles each of the kernel's
    gate paths runs (`gate_mode`): 1 every tile inside one gate row (the gate folded into the scale and bias
    vectors), 2 at most two per tile (two loads, a select per row), 3 a gather."""
    K, N = 64, 72
    if gate_shape is not None:
        assert W.gate_mode(M, W.gate_rows_of(M, N, torch.empty(gate_shape)), SMALL.block_m) == gate_path
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    res = (torch.randn(M, N) * 4).to(torch.bfloat16)
    gate = None if gate_shape is None else torch.randn(gate_shape)
    xq, xs = Q.quantize_rows(x, mode)
    wq, ws = Q.quantize_weight(w, mode)
    cfg = replace(SMALL, tma=tma)
    got = W.w8a8_matmul(xq, xs, wq, ws, b, out_dtype=torch.bfloat16, config=cfg, residual=res, gate=gate)
    ref = W.w8a8_matmul_reference(xq, xs, wq, ws, b, out_dtype=torch.float32, residual=res, gate=gate)
    assert got.dtype == torch.bfloat16 and ((got.float() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-5).all()
    y = W.w8a8_matmul_reference(xq, xs, wq, ws, b, out_dtype=torch.float32)
    g = torch.ones(1, N) if gate is None else gate.reshape(-1, N)
    manual = res.float() + (y.view(g.shape[0], -1, N) * g[:, None]).view(M, N)  # the model's formula
    assert torch.allclose(ref, manual, atol=1e-5)
    with pytest.raises(ValueError, match="residual must be a float tensor of shape"):
        W.w8a8_matmul(xq, xs, wq, ws, b, residual=res[:3])
    with pytest.raises(ValueError, match="gate must have shape"):
        W.w8a8_matmul(xq, xs, wq, ws, b, residual=res, gate=torch.randn(3, N))
    with pytest.raises(ValueError, match="gate needs a residual"):
        W.w8a8_matmul(xq, xs, wq, ws, b, gate=torch.randn(N))
    with pytest.raises(ValueError, match="cannot be combined"):
        W.w8a8_matmul(xq, xs, wq, ws, b, residual=res, out_quant="int8", out_scale=0.1)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("M,K,N,dtype", [(37, 80, 50, torch.float32), (33, 64, 40, torch.bfloat16), (1, 32, 8, torch.float32)],
                         ids=["ragged-K", "bf16-in", "one-token"])
def test_gemm_static_input_quant_fused_equals_two_kernels(mode, M, K, N, dtype):
    """Quantizing A inside the K loop with a static scale gives the numbers of quantize_rows + the GEMM:
    the same per-element quantization (bit-exact, as the quantizer kernel's), the same accumulation."""
    x, w, b = torch.randn(M, K).to(dtype), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    x[0, :3] = torch.tensor([40.0, -40.0, 0.0])  # beyond the static range: saturates in both paths
    act_scale = 2.5 / Q.QMAX[mode]
    wq, ws = Q.quantize_weight(w, mode)
    xq, xs = Q.quantize_rows(x, mode, act_scale)
    two = W.w8a8_matmul(xq, xs, wq, ws, b, out_dtype=torch.float32, backend="triton", config=SMALL)
    fused = W.w8a8_matmul_static_input(x, act_scale, wq, ws, b, out_dtype=torch.float32, config=SMALL)
    ref = W.w8a8_matmul_static_input_reference(x, act_scale, wq, ws, b, out_dtype=torch.float32)
    tol = 1e-6 if mode == "int8" else 1e-5  # as test_gemm_kernel_matches_reference
    assert rel(fused, two) <= tol and rel(fused, ref) <= tol
    g = W.w8a8_matmul_static_input(x, act_scale, wq, ws, None, config=SMALL, activation="gelu_tanh")
    r = W.w8a8_matmul_static_input_reference(x, act_scale, wq, ws, None, out_dtype=torch.float32, activation="gelu_tanh")
    assert g.dtype == torch.bfloat16 and ((g.float() - r).abs() <= 2 ** -7 * r.abs() + 1e-6).all()


def test_gemm_static_input_quant_bad_inputs():
    wq, ws = Q.quantize_weight(torch.randn(8, 16), "fp8")
    with pytest.raises(ValueError, match="static act_scale must be > 0"):
        W.w8a8_matmul_static_input(torch.randn(4, 16), 0.0, wq, ws)
    with pytest.raises(TypeError, match="2-D float tensor"):
        W.w8a8_matmul_static_input(torch.randn(2, 4, 16), 0.1, wq, ws)
    with pytest.raises(ValueError, match="must agree in K"):
        W.w8a8_matmul_static_input(torch.randn(4, 12), 0.1, wq, ws)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        W.w8a8_matmul_static_input(torch.randn(4, 16), 0.1, wq, ws[:3])
    assert W.w8a8_matmul_static_input(torch.randn(0, 16), 0.1, wq, ws, config=SMALL).shape == (0, 8)


def test_gemm_bad_inputs():
    xq, xs = Q.quantize_rows(torch.randn(4, 16), "int8")
    wq, ws = Q.quantize_weight(torch.randn(8, 16), "fp8")
    with pytest.raises(TypeError, match="must match x_q dtype"):
        W.w8a8_matmul(xq, xs, wq, ws)
    wq, ws = Q.quantize_weight(torch.randn(8, 12), "int8")
    with pytest.raises(ValueError, match="must agree in K"):
        W.w8a8_matmul(xq, xs, wq, ws)
    wq, ws = Q.quantize_weight(torch.randn(8, 16), "int8")
    with pytest.raises(ValueError, match="x_scale must have shape"):
        W.w8a8_matmul(xq, xs[:2], wq, ws)
    with pytest.raises(ValueError, match="bias must have shape"):
        W.w8a8_matmul(xq, xs, wq, ws, torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be one of"):
        W.w8a8_matmul(xq, xs, wq, ws, backend="cublas")
    with pytest.raises(ValueError, match="needs either a static out_scale or an out_group"):
        W.w8a8_matmul(xq, xs, wq, ws, out_quant="int8")
    with pytest.raises(ValueError, match="needs either a static out_scale or an out_group"):
        W.w8a8_matmul(xq, xs, wq, ws, out_quant="int8", out_scale=0.1, out_group=16)
    with pytest.raises(ValueError, match="out_group must be a positive int dividing N"):
        W.w8a8_matmul(xq, xs, wq, ws, out_quant="int8", out_group=7)
    with pytest.raises(ValueError, match="out_group needs out_quant"):
        W.w8a8_matmul(xq, xs, wq, ws, out_group=16)
    with pytest.raises(ValueError, match=r"x_scale must have shape .* or \(K // G"):
        W.w8a8_matmul(xq, torch.ones(3, xq.shape[0]), wq, ws)  # 3 groups do not divide K
    with pytest.raises(ValueError, match="mode must be one of"):
        Q.quantize_rows(torch.randn(2, 4), "int4")
    with pytest.raises(ValueError, match="static act_scale must be > 0"):
        Q.quantize_rows(torch.randn(2, 4), "int8", static_scale=0.0)


# ----------------------------------------------------------------------------- fused norm + modulation + quant
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("quant,static", [(None, None), ("int8", None), ("fp8", None), ("int8", 0.05)])
def test_norm_modulate_quant_kernel(norm, quant, static):
    B, L, C = 2, 5, 200
    x = (torch.randn(B, L, C) * 2 + 1).to(torch.bfloat16)
    shift, scale = torch.randn(B, C), 0.1 * torch.randn(B, L, C)  # per-sample shift, per-token scale
    w, b = torch.randn(C), torch.randn(C)
    kw = dict(norm=norm, weight=w, bias=b, quant=quant, act_scale=static)
    got = NQ.norm_modulate_quant(x, shift, scale, **kw)
    ref = NQ.norm_modulate_quant_reference(x, shift, scale, **kw)
    if quant is None:
        assert got.shape == x.shape and got.dtype == x.dtype
        assert ((got.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-6).all()  # one bf16 ulp
        return
    (gq, gs), (rq, rs) = got, ref
    assert gq.shape == (B * L, C) and gq.dtype == Q.QDTYPE[quant]
    assert torch.allclose(gs, rs, rtol=1e-6, atol=0)
    assert (gq.float() != rq.float()).float().mean() <= 1e-3
    step = rs[:, None] if quant == "int8" else 2 ** -3 * Q.dequantize(rq, rs).abs() + 2 ** -9 * rs[:, None]
    assert ((Q.dequantize(gq, gs) - Q.dequantize(rq, rs)).abs() <= step * (1 + 1e-5)).all()


def test_norm_modulate_quant_matches_model_math():
    """Same y as the Wan block's eager LayerNorm + modulation (fp32), then per-token int8."""
    x = torch.randn(1, 33, 64)
    shift, scale = torch.randn(1, 64), 0.1 * torch.randn(1, 64)
    y = F.layer_norm(x, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    q, s = NQ.norm_modulate_quant(x, shift, scale, quant="int8")
    assert ((Q.dequantize(q, s) - y[0]).abs() <= s[:, None] / 2 + 1e-5).all()
    assert torch.allclose(NQ.norm_modulate_quant(x, shift[0], None, quant=None), F.layer_norm(x, (64,), eps=1e-6) + shift,
                          atol=1e-5)


def test_norm_modulate_quant_bad_inputs():
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="norm must be one of"):
        NQ.norm_modulate_quant(x, norm="batch")
    with pytest.raises(ValueError, match="scale must have shape"):
        NQ.norm_modulate_quant(x, None, torch.randn(3, 16))
    with pytest.raises(ValueError, match="quant must be one of"):
        NQ.norm_modulate_quant(x, quant="int4")


def test_descriptor_kernels_only_where_they_were_timed(monkeypatch):
    # CPU tensors: only under the interpreter (tests); CUDA: compute capability 9.0+ (checked on the device)
    from turbo_kernels.utils import descriptors_supported

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert descriptors_supported(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not descriptors_supported(torch.zeros(1))
    # a Triton without host-side descriptors: pointer kernels everywhere, and the GEMM still runs (on them)
    import turbo_kernels.utils as utils

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(utils, "TensorDescriptor", None)
    assert not descriptors_supported(torch.zeros(1))
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    xq, xs = Q.quantize_rows(x, "int8")
    wq, ws = Q.quantize_weight(w, "int8")
    got = W.w8a8_matmul(xq, xs, wq, ws, out_dtype=torch.float32, config=replace(SMALL, tma=True))
    assert torch.equal(got, W.w8a8_matmul(xq, xs, wq, ws, out_dtype=torch.float32, config=SMALL))


def test_static_inv_scale_is_torchs_fp32_arithmetic():
    """static_inv_scale (plain float arithmetic, on every statically quantized call) gives exactly what fp32 tensors
    give: s rounded to fp32, then the fp32 quotient 1/s, for numbers and one-element tensors, across fp32's range
    (subnormal scales whose inverse overflows to inf included); scales <= 0, NaN or below fp32's range refused."""
    def torch_fp32(x):
        s = torch.tensor(float(x), dtype=torch.float32)
        return float(torch.tensor(1.0) / s), float(s)

    g = torch.Generator().manual_seed(0)
    values = (torch.rand(2000, generator=g, dtype=torch.float64) * 190 - 100).exp().tolist()  # e^-100 .. e^90
    values += [0.5, 0.017, 3.4028234663852886e38, 1.4e-45, 2.9e-39, float("inf")]
    for x in values:
        assert Q.static_inv_scale(x) == torch_fp32(x), x
    assert Q.static_inv_scale(torch.tensor([0.25])) == (4.0, 0.25)
    for bad in (0.0, -1.0, float("nan"), 1e-50, torch.tensor([0.0])):
        with pytest.raises(ValueError, match="act_scale must be > 0"):
            Q.static_inv_scale(bad)


def test_default_config_fits_the_devices_shared_memory(monkeypatch):
    """The descriptor default (4 stages of 128x256x128 tiles, ~224 KiB) only where the device lets a block have that
    much shared memory (H100 / B200); GPUs with descriptors but ~99 KiB per block (RTX 5090) get the pointer config,
    as do GPUs without descriptors."""
    from types import SimpleNamespace

    from turbo_kernels import utils

    fake = SimpleNamespace(is_cuda=True, device="cuda:0")
    monkeypatch.setattr(W, "descriptors_supported", lambda t: True)
    for smem, want in ((232_448, W.DEFAULT_GEMM_CONFIG), (101_376, W.POINTER_GEMM_CONFIG)):
        monkeypatch.setattr(W, "smem_per_block", lambda device, smem=smem: smem)
        assert W.default_gemm_config(fake) == want
    monkeypatch.setattr(W, "descriptors_supported", lambda t: False)
    assert W.default_gemm_config(fake) == W.POINTER_GEMM_CONFIG
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(major=12, minor=0, shared_memory_per_block_optin=None))
    assert utils.smem_per_block("cuda:0") == 101_376  # not reported: by capability
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=232_448))
    assert utils.smem_per_block("cuda:0") == 232_448
