"""turbo_infer.layers.compile_ops: the runtime's kernel calls as custom ops. Checked on the CPU, where each
op runs the torch references: the fake (meta) implementation agrees with the real one (opcheck), and
torch.compile(fullgraph=True) keeps each op as one graph node with the eager results."""
import pytest
import torch

from turbo_infer.layers import compile_ops as ops
from turbo_infer.layers.lowbit_attention import SageAttention, SageSparseLinearAttention
from turbo_infer.quant import W8A8Linear


def qkv(L=40, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, L, D, generator=g).to(dtype) for _ in range(3))


def linear_args(mode="int8", act_scale=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    m = W8A8Linear.from_linear(lin, mode=mode, act_scale=act_scale)
    return m, (torch.randn(3, 5, 32), m.weight_q, m.weight_scale, m.bias, m.smooth_inv, m.static_scale, mode, False)


@pytest.mark.parametrize("name", ["sla", "sage", "sagesla", "w8a8_int8", "w8a8_fp8_static", "norm_rope", "rms_norm"])
def test_fake_implementation_agrees_with_the_real_one(name):
    q, k, v = qkv()
    W, b = torch.randn(32, 32) * 0.1, torch.randn(32) * 0.1
    cases = {
        "sla": (ops.sla_forward, (q, k, v, W, b, 0.5, 16, 16, "softmax")),
        "sage": (ops.sage_forward, (q, k, v, "fp8")),
        "sagesla": (ops.sagesla_forward, (q, k, v, W, b, 0.5, 16, 16, "softmax", "fp8")),
        "w8a8_int8": (ops.w8a8_linear, linear_args("int8")[1]),
        "w8a8_fp8_static": (ops.w8a8_linear, linear_args("fp8", act_scale=0.05)[1]),
        "norm_rope": (ops.norm_rope, (torch.randn(2, 6, 24), torch.rand(24) + 0.5, torch.rand(6, 4), torch.rand(6, 4),
                                      3, 1e-6)),
        "rms_norm": (ops.rms_norm, (torch.randn(2, 6, 24), torch.rand(24) + 0.5, 1e-6)),
    }
    op, args = cases[name]
    # test_schema compares the inputs before and after with ops that the CPU lacks for float8 (an fp8
    # weight): the fp8 case checks the fake implementation only
    utils = ("test_faketensor",) if "fp8" in name else ("test_schema", "test_faketensor")
    torch.library.opcheck(op.op, args, test_utils=utils)  # the registered op (eager calls skip it)


def test_modules_compile_to_one_graph_with_the_eager_results():
    """A block of the runtime's low-bit modules under torch.compile(fullgraph=True): no graph break (a
    traced Triton launch or data-dependent Python would break it) and the eager numbers."""
    torch.manual_seed(0)
    lin, _ = linear_args()
    sage, sagesla = SageAttention(32), SageSparseLinearAttention(32, topk=0.5, block_q=16, block_k=16)
    with torch.no_grad():
        sagesla.proj_l.weight.normal_(std=0.1)

    def block(x):  # (B, L, 32) -> (B, L, 24)
        h = x.unflatten(-1, (1, 32)).transpose(1, 2)  # (B, 1, L, 32)
        a = sage(h, h, h) + sagesla(h, h, h)
        return lin(torch.nn.functional.gelu(a.transpose(1, 2).flatten(-2)))

    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


def test_w8a8_module_keeps_its_errors_and_results():
    m, args = linear_args()
    x = args[0]
    with pytest.raises(ValueError, match="in_features"):
        m(torch.randn(3, 31))
    ref = x @ m.dequantized_weight().T + m.bias
    assert (m(x) - ref).abs().max() / ref.abs().max() < 2e-2  # int8 per-token: the module's own bound


@pytest.mark.parametrize("fuse", [False, True], ids=["epilogue_kernel", "fused_linear"])
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_sagesla_kernel_path_equals_its_references(pv, fuse, monkeypatch):
    """The op's GPU path (low-bit sparse kernel, then SLA's linear state and epilogue kernel written over
    its output; or with SparseLowbitConfig.fuse_linear the linear branch in the sparse kernel's epilogue), run
    here in the Triton interpreter, against the references composed the same way (the
    sparse reference with the kernel's key grouping, the torch linear branch). The quantization is
    identical (test_lowbit checks it bitwise); what differs is summation order and, with fp8 PV, an
    occasional P rounded to the neighbouring fp8 value: fp16 outputs of O(1) -> 2e-3."""
    from dataclasses import replace

    from turbo_kernels.attention import lowbit_sparse
    from turbo_kernels.attention.blockmap import sla_block_map

    monkeypatch.setattr(lowbit_sparse, "DEFAULT_SPARSE_CONFIG",
                        replace(lowbit_sparse.DEFAULT_SPARSE_CONFIG, fuse_linear=fuse))
    from turbo_kernels.attention.lowbit_sparse import DEFAULT_SPARSE_CONFIG, key_group, sagesla_sparse_reference
    from turbo_kernels.attention.sla import add_linear_branch

    q, k, v = (t.half() for t in qkv(L=80, D=32))
    W, b = torch.randn(32, 32) * 0.1, torch.randn(32) * 0.1
    bm = sla_block_map(q, k, 0.3, 16, 16)
    o_s = sagesla_sparse_reference(q, k, v, bm, pv=pv, group=key_group(DEFAULT_SPARSE_CONFIG, 16, pv == "fp8"),
                                   i2f=DEFAULT_SPARSE_CONFIG.i2f)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch linear branch
    ref = add_linear_branch(o_s, q, k, v, bm, W, b)
    monkeypatch.setattr(ops, "_fast_lowbit", lambda t, p: (True, p))
    got = ops.sagesla_forward(q, k, v, W, b, 0.3, 16, 16, "softmax", pv)
    assert got.dtype == torch.float16 and got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kernels", [False, True], ids=["references", "interpreter"])
@pytest.mark.parametrize("name", ["sla", "sage", "sagesla"])
def test_attention_ops_answer_token_major_inputs_token_major(name, kernels, monkeypatch):
    """The DiT hands the attention q, k, v as per-head views of its (B, L, H, D) tokens and reads the output back
    as (B, L, H·D): the ops write such inputs' outputs in that layout (no copy either side), other inputs' outputs
    contiguous, with the same values, and the fake implementation has the real strides."""
    from turbo_kernels.utils import token_major

    monkeypatch.setenv("TRITON_INTERPRET", "1" if kernels else "0")
    if kernels:
        monkeypatch.setattr(ops, "_fast_lowbit", lambda t, p: (True, p))
    q, k, v = (t.half() if kernels else t for t in qkv(L=48))
    tq, tk, tv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # token-major views
    assert token_major(tq) and not token_major(q)
    W, b = torch.randn(32, 32) * 0.1, torch.randn(32) * 0.1
    rest = {"sla": (W, b, 0.5, 16, 16, "softmax"), "sage": ("fp8",), "sagesla": (W, b, 0.5, 16, 16, "softmax", "fp8")}
    op = {"sla": ops.sla_forward, "sage": ops.sage_forward, "sagesla": ops.sagesla_forward}[name]
    got, plain = op(tq, tk, tv, *rest[name]), op(q, k, v, *rest[name])
    assert token_major(got) and plain.is_contiguous()
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    (B, H, L, D) = got.shape
    assert got.transpose(1, 2).reshape(B, L, H * D).data_ptr() == got.data_ptr()  # the DiT's reshape is a view
    if not kernels:
        torch.library.opcheck(op.op, (tq, tk, tv, *rest[name]), test_utils=("test_faketensor",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_kernel_matches_the_models_rmsnorm(dtype):
    """turbo::rms_norm (the Triton norm kernel with norm="rms", in the interpreter) computes what WanModel's
    RMSNorm does in torch: fp32 math, the same rounding back to x's dtype up to the sum's order (one ulp of fp16;
    fp32 within 1e-5 relative)."""
    from turbo_infer.models.wan import RMSNorm

    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    x = (torch.randn(2, 7, 48) * 3).to(dtype)
    want = norm(x)  # the torch chain (CPU tensors never take the kernel)
    got = ops.rms_norm(x, norm.weight.to(dtype), 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


def test_rmsnorm_takes_the_kernel_where_its_placement_says(monkeypatch):
    """RMSNorm routes to turbo::rms_norm when fused kernels apply (CUDA inference; faked here) and
    FUSED_RMS_NORM allows it: "eager" and "always" outside torch.compile, never under "never"; a bad placement is
    refused with the setting's name."""
    from turbo_infer.models import wan

    calls = []
    monkeypatch.setattr(wan, "fused_norm_rope_applies", lambda t: True)
    monkeypatch.setattr(ops, "rms_norm", lambda x, w, eps: calls.append(eps) or x)
    norm = wan.RMSNorm(8, 1e-5)
    x = torch.randn(2, 8)
    for mode, used in (("eager", True), ("always", True), ("never", False)):
        monkeypatch.setattr(wan, "FUSED_RMS_NORM", mode)
        calls.clear()
        norm(x)
        assert bool(calls) == used, mode
    monkeypatch.setattr(wan, "FUSED_RMS_NORM", "sometimes")
    with pytest.raises(ValueError, match="FUSED_RMS_NORM"):
        norm(x)
