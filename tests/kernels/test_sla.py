"""SLA (sparse-linear attention): Triton kernels vs the pure-torch reference, on the CPU interpreter.

Shapes are small and awkward (L = 200 with 32 x 16 map blocks: a ragged 8-token query tail and a
ragged 8-token key tail, several blocks per row), kernel tiles smaller than, equal to and larger
than the map blocks. Same inputs are cloned into both paths; the same BlockMap is passed to both
so that the comparison is of the attention arithmetic (test_blockmap.py checks the map).

dtype -> (atol, rtol), and why:
    float32: (1e-4, 1e-4)  the interpreter's fp32 tl.dot is exact fp32 math; only the summation
                           order (online softmax, block GEMMs) differs: ~1e-6 observed.
    float16: (4e-3, 4e-3)  P (and dS) are rounded to fp16 before the second matmul (rel 2^-11 ~
                           5e-4 per term) and the linear branch's GEMM outputs are fp16; outputs
                           and gradients are O(1), observed max errors ~1e-3.
bfloat16 is not tested here: the interpreter's bf16 tl.dot is wrong; it is checked on the GPU by
tools/bench_attention.py (error vs the reference in the printed table).
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from turbo_kernels.attention.blockmap import sla_block_map
from turbo_kernels.attention.sla import (SLAKernelConfig, _sparse_forward, add_linear_branch, linear_branch,
                                         sla_attention, sla_reference, sparse_attention)

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3)}

# Kernel tiles for 32 x 16 map blocks: equal to the map blocks, and a mix where forward/dQ tiles
# gather two table entries (block_n 32 > block_k 16) and dK/dV tiles split query blocks (16 < 32).
# The linear branch in the sparse kernels' epilogues, forward and backward:
CFG_EQUAL = SLAKernelConfig(fwd_block_m=32, fwd_block_n=16, dq_block_m=32, dq_block_n=16, dkdv_block_m=32,
                            dkdv_block_n=16, fwd_warps=4, dq_warps=4, dkdv_warps=4, fuse_linear_bwd=True)
CFG_MIXED = SLAKernelConfig(fwd_block_m=16, fwd_block_n=32, dq_block_m=16, dq_block_n=32, dkdv_block_m=16,
                            dkdv_block_n=16, fwd_warps=4, dq_warps=4, dkdv_warps=4, fuse_linear_bwd=True)
# the linear branch in separate kernels after the sparse ones instead of in their epilogues
CFG_UNFUSED = replace(CFG_EQUAL, fuse_linear=False, fuse_linear_bwd=False)
CFG_UNFUSED_MIXED = replace(CFG_MIXED, fuse_linear=False, fuse_linear_bwd=False)
# the default's mix: fused forward, separate backward
CFG_DEFAULT_MIX = replace(CFG_EQUAL, fuse_linear_bwd=False)


def assert_close(got, ref, dtype, name):
    atol, rtol = TOL[dtype]
    got, ref = got.float(), ref.float()
    err = (got - ref).abs()
    bad = err > atol + rtol * ref.abs()
    if bad.any():
        idx = torch.topk(err.flatten(), min(5, err.numel())).indices
        worst = [(tuple(int(i) for i in torch.unravel_index(j, err.shape)), got.flatten()[j].item(),
                  ref.flatten()[j].item()) for j in idx]
        raise AssertionError(f"{name}: {int(bad.sum())}/{err.numel()} elements off (atol {atol}, rtol {rtol}); "
                             f"worst (index, got, ref): {worst}")
    assert torch.isfinite(got).all(), f"{name}: non-finite values"


def make_inputs(dtype, B=1, H=2, Lq=200, Lk=200, D=32):
    q = torch.randn(B, H, Lq, D, dtype=dtype)
    k = torch.randn(B, H, Lk, D, dtype=dtype)
    v = torch.randn(B, H, Lk, D, dtype=dtype)
    return q, k, v


def proj(D, dtype=torch.float32):
    return torch.randn(D, D, dtype=dtype) / math.sqrt(D), 0.1 * torch.randn(D, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("cfg", [CFG_EQUAL, CFG_MIXED], ids=["equal", "mixed"])
def test_sparse_forward_matches_reference(dtype, cfg):
    q, k, v = make_inputs(dtype)
    bm = sla_block_map(q, k, 0.3, 32, 16)
    o_s = sparse_attention(q, k, v, bm, cfg)
    ref_s, _ = sla_reference(q, k, v, 0.3, 32, 16, block_map=bm, return_branches=True)
    assert o_s.dtype == dtype and o_s.shape == q.shape
    assert_close(o_s, ref_s, dtype, "O_s")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tau", [1.0, 8.0])
@pytest.mark.parametrize("cfg", [CFG_EQUAL, CFG_MIXED], ids=["equal", "mixed"])
def test_sparse_forward_lazy_rescale(dtype, tau, cfg):
    """Lazy rescaling (fwd_rescale_tau): the running max moves only by more than tau, P reaches up to 2^tau
    before its cast. On keys whose scores climb in two steps (~6 log2 units each, along the queries' shared
    direction) some tiles move a row's max and others leave every row within tau; the output and the LSE
    the backward uses must still match the reference to the same tolerance."""
    q, k, v = make_inputs(dtype)
    D, Lk = q.shape[-1], k.shape[2]
    u = torch.ones(D) / math.sqrt(D)
    level = torch.div(torch.arange(Lk) * 3, Lk, rounding_mode="floor").float()
    q = (0.5 * q.float() + 2.0 * u).to(dtype)
    k = (k.float() + 12.0 * level[:, None] * u).to(dtype)
    bm = sla_block_map(q, k, 0.5, 32, 16)
    c = replace(cfg, fwd_rescale_tau=tau)
    o_s = sparse_attention(q, k, v, bm, c)
    ref_s, _ = sla_reference(q, k, v, 0.5, 32, 16, block_map=bm, return_branches=True)
    assert_close(o_s, ref_s, dtype, f"O_s (tau {tau})")
    o_plain, lse_plain, _ = _sparse_forward(q, k, v, bm, cfg.clamp(32, 16), store_lse=True)
    o_lazy, lse_lazy, _ = _sparse_forward(q, k, v, bm, c.clamp(32, 16), store_lse=True)
    torch.testing.assert_close(lse_lazy, lse_plain, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("block_n", [32, 64])
@pytest.mark.parametrize("Lk,topk", [(192, 0.25), (192, 0.5), (200, 0.25), (200, 0.4), (200, 0.1), (40, 1.0)])
def test_sparse_forward_grouped_tiles(block_n, Lk, topk):
    # forward tiles of 2 or 4 whole map blocks (block_k 16): the grouped entries run unmasked, the rest
    # (fewer than a group, and the ragged last block when Lk % 16 != 0) block by block; n = 1..12 entries
    q, k, v = make_inputs(torch.float32, Lq=96, Lk=Lk, D=16)
    bm = sla_block_map(q, k, topk, 32, 16)
    cfg = replace(CFG_EQUAL, fwd_block_n=block_n)
    o_s = sparse_attention(q, k, v, bm, cfg)
    ref_s, _ = sla_reference(q, k, v, topk, 32, 16, block_map=bm, return_branches=True)
    assert_close(o_s, ref_s, torch.float32, f"O_s (n={bm.n}, block_n={block_n}, Lk={Lk})")


@pytest.mark.parametrize("blocks", [2, 3, 16])
@pytest.mark.parametrize("fold", [False, True], ids=["state", "state-folded"])
def test_linear_state_blocks_per_program(blocks, fold):
    """state_blocks: several key blocks per program of the state kernel (W^T loaded once, a loop over the blocks),
    including a last program with blocks past the end (10 key blocks of 16 with a ragged 8-token tail; 3 and 16 do
    not divide 10): the same h_j, z_j as one block per program, bit for bit (each block's arithmetic is unchanged)."""
    from turbo_kernels.attention.sla import _state_sums

    q, k, v = make_inputs(torch.float16, Lq=96, Lk=152)
    Nk = 10
    wt = (torch.randn(k.shape[-1], k.shape[-1]) / 8).to(torch.float16)
    outs = []
    for cfg in (replace(CFG_EQUAL, state_blocks=1), replace(CFG_EQUAL, state_blocks=blocks)):
        hs = torch.full((2, Nk, 32, 32), float("nan"), dtype=torch.float16)
        zs = torch.full((2, Nk, 32), float("nan"), dtype=torch.float16)
        _state_sums(k, v, Nk, 16, "softmax", wt, cfg.clamp(32, 16), fold, hs, zs)
        outs.append((hs, zs))
    assert torch.isfinite(outs[1][0]).all() and torch.isfinite(outs[1][1]).all()  # every block written
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with pytest.raises(ValueError, match="config.state_blocks"):
        replace(CFG_EQUAL, state_blocks=0).clamp(32, 16)


def test_state_blocks_fall_back_to_one_where_shared_memory_is_short(monkeypatch):
    """Several key blocks per state program need ~144 KiB of shared memory: on a CUDA device with less (an RTX 4090 /
    5090, ~99 KiB per block) one block per program; at most as many blocks as there are; the CPU keeps the setting."""
    from types import SimpleNamespace

    from turbo_kernels.attention import sla

    cfg = replace(CFG_EQUAL, state_blocks=8)
    cuda_k = SimpleNamespace(is_cuda=True, device="cuda:0")
    for smem, want in ((232_448, 8), (166_912, 8), (101_376, 1)):
        monkeypatch.setattr(sla, "smem_per_block", lambda device, smem=smem: smem)
        assert sla._state_blocks(cfg, 512, cuda_k) == want
    assert sla._state_blocks(cfg, 3, torch.zeros(1)) == 3
    assert sla._state_blocks(replace(cfg, state_blocks=1), 512, cuda_k) == 1


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_linear_branch_matches_reference(feature_map, dtype):
    q, k, v = make_inputs(dtype, Lq=200, Lk=150)
    bm = sla_block_map(q, k, 0.2, 32, 16)
    _, ref_l = sla_reference(q, k, v, 0.2, 32, 16, feature_map, block_map=bm, return_branches=True)
    assert_close(linear_branch(q, k, v, bm, feature_map), ref_l, dtype, f"O_l[{feature_map}]")


@pytest.mark.parametrize("feature_map,dtype,cfg", [("softmax", torch.float16, CFG_MIXED),
                                                  ("elu", torch.float32, CFG_EQUAL),
                                                  ("relu", torch.float16, CFG_EQUAL),
                                                  ("softmax", torch.float16, CFG_UNFUSED_MIXED)])
def test_fused_inference_forward(feature_map, dtype, cfg):
    # no grad: state kernel + marginal GEMMs + one kernel with the linear branch and proj_l fused
    q, k, v = make_inputs(dtype, Lq=200, Lk=170, D=24)
    W, b = proj(24)
    bm = sla_block_map(q, k, 0.25, 32, 16)
    with torch.no_grad():
        o = sla_attention(q, k, v, W, b, 0.25, 32, 16, feature_map, block_map=bm, config=cfg)
    ref = sla_reference(q, k, v, 0.25, 32, 16, feature_map, proj_l=(W, b), block_map=bm)
    assert o.dtype == dtype
    assert_close(o, ref, dtype, f"fused O[{feature_map}]")


@pytest.mark.parametrize("feature_map,dtype", [("softmax", torch.float16), ("elu", torch.float32)])
def test_overlapped_inference_computes_what_one_stream_does(feature_map, dtype, monkeypatch):
    """config.overlap_state (state kernel and marginal GEMMs on a second CUDA stream, beside the map and the
    sparse kernel): the same kernels on the same buffers; in the interpreter (one stream) the output is
    identical to the one-stream path, and the path is the one taken when sla_attention builds the map."""
    import turbo_kernels.attention.sla as sla_mod

    q, k, v = make_inputs(dtype, Lq=200, Lk=170, D=24)
    W, b = proj(24)
    calls = []
    real = sla_mod._overlapped_inference
    monkeypatch.setattr(sla_mod, "_overlapped_inference", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        one = sla_attention(q, k, v, W, b, 0.25, 32, 16, feature_map, config=CFG_UNFUSED)
        two = sla_attention(q, k, v, W, b, 0.25, 32, 16, feature_map, config=replace(CFG_UNFUSED, overlap_state=True))
    assert calls == [1] and two.dtype == dtype
    assert torch.equal(one, two)


def test_inference_folds_proj_l_into_the_linear_state():
    # (phi(q) Hm / den) W^T == phi(q) (Hm W^T) / den: inference passes Hm W^T and skips the epilogue's
    # second product; training keeps Hm and W^T apart (the backward needs Hm itself)
    from turbo_kernels.attention.sla import DEFAULT_CONFIG, _linear_state

    q, k, v = make_inputs(torch.float32, Lq=96, Lk=80, D=16)
    W, _ = proj(16)
    bm = sla_block_map(q, k, 0.25, 32, 16)
    hm, zm, wt = _linear_state(q, k, v, bm, "softmax", W, DEFAULT_CONFIG)
    hmw, zm2, none = _linear_state(q, k, v, bm, "softmax", W, DEFAULT_CONFIG, fold=True)
    assert none is None and torch.equal(zm, zm2) and torch.equal(wt, W.t())
    torch.testing.assert_close(hmw, hm @ W.t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,feature_map,interpret", [(torch.float32, "softmax", "1"), (torch.float16, "elu", "1"),
                                                          (torch.float32, "softmax", "0")])
def test_add_linear_branch_completes_a_sparse_output(dtype, feature_map, interpret, monkeypatch):
    # sagesla's path: a sparse-branch output from another kernel + SLA's linear state and epilogue kernel
    # (interpreter) or the torch linear_branch (no interpreter) = the whole SLA output
    q, k, v = make_inputs(dtype, Lq=200, Lk=170, D=24)
    W, b = proj(24)
    bm = sla_block_map(q, k, 0.25, 32, 16)
    ref = sla_reference(q, k, v, 0.25, 32, 16, feature_map, proj_l=(W, b), block_map=bm)
    ref_s, _ = sla_reference(q, k, v, 0.25, 32, 16, feature_map, block_map=bm, return_branches=True)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    o_s = ref_s.to(dtype).clone()
    o = add_linear_branch(o_s, q, k, v, bm, W, b, feature_map)
    assert o.dtype == dtype and o.shape == q.shape and torch.equal(o_s, ref_s.to(dtype))  # O_s left as it was
    assert_close(o, ref, dtype, f"O_s + proj_l(O_l) [{feature_map}, interpret {interpret}]")
    if interpret == "1":
        inplace = add_linear_branch(o_s, q, k, v, bm, W, b, feature_map, inplace=True)
        assert inplace.data_ptr() == o_s.data_ptr()  # written over O_s (contiguous, q's dtype)
        assert_close(inplace, ref, dtype, "in place")
        strided = ref_s.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D)-major O_s
        assert_close(add_linear_branch(strided, q, k, v, bm, W, b, feature_map, inplace=True), ref, dtype,
                     "strided O_s")


def test_add_linear_branch_without_marginal_blocks_adds_the_bias_and_checks_its_inputs():
    q, k, v = make_inputs(torch.float32, Lq=64, Lk=64, D=16)
    W, b = proj(16)
    bm = sla_block_map(q, k, 1.0, 16, 16)
    o_s = torch.randn_like(q)
    torch.testing.assert_close(add_linear_branch(o_s.clone(), q, k, v, bm, W, b), o_s + b)
    with pytest.raises(ValueError, match="o_s"):
        add_linear_branch(o_s[:, :, :10], q, k, v, bm, W, b)
    other = sla_block_map(q[:, :, :48], k, 1.0, 16, 16)
    with pytest.raises(ValueError, match="block map"):
        add_linear_branch(o_s, q, k, v, other, W, b)


def test_linear_branch_is_zero_without_marginal_blocks():
    q, k, v = make_inputs(torch.float32, Lq=70, Lk=70)
    bm = sla_block_map(q, k, 1.0, 32, 16)
    assert torch.count_nonzero(linear_branch(q, k, v, bm)) == 0
    _, ref_l = sla_reference(q, k, v, 1.0, 32, 16, block_map=bm, return_branches=True)
    assert torch.count_nonzero(ref_l) == 0


def _grads_vs_reference(dtype, cfg, Lq=200, Lk=200, D=32, topk=0.3, feature_map="softmax"):
    q, k, v = make_inputs(dtype, Lq=Lq, Lk=Lk, D=D)
    W, b = proj(D)
    bm = sla_block_map(q, k, topk, 32, 16)
    ours = [t.clone().requires_grad_() for t in (q, k, v, W, b)]
    ref = [t.clone().requires_grad_() for t in (q, k, v, W, b)]
    o = sla_attention(*ours, topk, 32, 16, feature_map, block_map=bm, config=cfg)
    o_ref = sla_reference(*ref[:3], topk, 32, 16, feature_map, proj_l=(ref[3], ref[4]), block_map=bm)
    assert o.dtype == dtype
    assert_close(o, o_ref, dtype, "O")
    g = torch.randn_like(o)
    o.backward(g)
    o_ref.backward(g)
    for name, a, r in zip(("dq", "dk", "dv", "dW", "db"), ours, ref):
        assert a.grad is not None, f"{name} missing"
        # dW/db sum over all B*H*L rows: scale the tolerance by the gradient's magnitude
        scale = 1.0 if name in ("dq", "dk", "dv") else max(1.0, r.grad.abs().max().item())
        assert_close(a.grad / scale, r.grad / scale, dtype, name)


@pytest.mark.parametrize("dtype,cfg", [(torch.float16, CFG_EQUAL), (torch.float16, CFG_MIXED),
                                       (torch.float32, CFG_MIXED), (torch.float16, CFG_UNFUSED_MIXED),
                                       (torch.float16, CFG_DEFAULT_MIX),
                                       (torch.float16, replace(CFG_MIXED, fwd_rescale_tau=8.0))],
                         ids=["fp16-equal", "fp16-mixed", "fp32-mixed", "fp16-unfused", "fp16-default-mix",
                              "fp16-lazy-rescale"])
def test_forward_and_every_gradient(dtype, cfg):
    _grads_vs_reference(dtype, cfg)


def test_training_under_autocast_builds_its_own_map_and_matches_the_reference():
    """A GPU fine-tune runs sla_attention inside a bf16 autocast region and lets it build the block map
    (default selection). fp16 autocast stands in for bf16 here (bf16 tl.dot is wrong in the interpreter).
    proj_l's fp32 weight is used in fp16 under autocast, so the fp16 tolerance applies, not exact equality."""
    q, k, v = make_inputs(torch.float16, Lq=150, Lk=150)
    W, b = proj(32)
    ours = [t.clone().requires_grad_() for t in (q, k, v, W, b)]
    ref = [t.clone().requires_grad_() for t in (q, k, v, W, b)]
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        o = sla_attention(*ours, 0.3, 32, 16, "softmax")
    o_ref = sla_reference(*ref[:3], 0.3, 32, 16, "softmax", proj_l=(ref[3], ref[4]))
    assert_close(o, o_ref, torch.float16, "O")
    g = torch.randn_like(o_ref)
    o.float().backward(g.float())
    o_ref.backward(g)
    for name, a, r in zip(("dq", "dk", "dv"), ours, ref):
        assert_close(a.grad, r.grad, torch.float16, name)
    assert ours[3].grad is not None and torch.isfinite(ours[3].grad).all()


def test_gradients_uneven_lengths_and_head_dim():
    # Lq != Lk (both ragged), head dim 24 (not a power of two: masked to 32), one block selected
    _grads_vs_reference(torch.float16, CFG_MIXED, Lq=90, Lk=75, D=24, topk=0.1, feature_map="elu")


def test_gradients_even_keys_relu():
    # Lk a multiple of block_k: the unmasked fast path of every key tile
    _grads_vs_reference(torch.float16, CFG_EQUAL, Lq=120, Lk=96, D=32, topk=0.4, feature_map="relu")


def test_gradients_unfused_elu_head_dim():
    _grads_vs_reference(torch.float16, CFG_UNFUSED, Lq=90, Lk=75, D=24, topk=0.3, feature_map="elu")


def test_topk_one_equals_dense_attention():
    q, k, v = make_inputs(torch.float16, Lq=200, Lk=200)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().float().requires_grad_() for t in (q, k, v)]
    zero_w, zero_b = torch.zeros(32, 32), torch.zeros(32)
    o = sla_attention(*ours, zero_w, zero_b, 1.0, 32, 16, config=CFG_MIXED)
    o_ref = F.scaled_dot_product_attention(*ref)
    assert_close(o, o_ref, torch.float16, "O vs SDPA")
    g = torch.randn_like(o_ref)
    o.backward(g.half())
    o_ref.backward(g)
    for name, a, r in zip(("dq", "dk", "dv"), ours, ref):
        assert_close(a.grad, r.grad, torch.float16, f"{name} vs SDPA")


def test_reference_gradcheck_float64():
    q, k, v = (torch.randn(1, 1, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    W = (0.3 * torch.randn(8, 8, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    bm = sla_block_map(q.detach(), k.detach(), 0.5, 16, 16)  # fixed map: selection is not differentiable

    def f(q, k, v, W, b):
        return sla_reference(q, k, v, 0.5, 16, 16, "softmax", proj_l=(W, b), block_map=bm)

    assert torch.autograd.gradcheck(f, (q, k, v, W, b), eps=1e-6, atol=1e-5, fast_mode=True)


def test_cpu_without_interpreter_falls_back_to_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_inputs(torch.float32, Lq=40, Lk=40, D=16)
    W, b = proj(16)
    o = sla_attention(q, k, v, W, b, 0.5, 16, 16)
    torch.testing.assert_close(o, sla_reference(q, k, v, 0.5, 16, 16, proj_l=(W, b)))


# sla_torch (the CPU path: gathered critical blocks + block-GEMM linear branch) against the dense-mask
# reference, forward and every gradient, in float32: the same math summed in another order, so the
# differences are rounding (~1e-6 observed at these sizes); 1e-4 is the float32 tolerance above.
@pytest.mark.parametrize("Lq,Lk,D,bq,bk,topk,fm", [
    (200, 200, 32, 32, 16, 0.3, "softmax"),  # ragged query and key tails
    (50, 77, 16, 16, 32, 0.5, "elu"),  # cross lengths, tail key block of 13 tokens
    (64, 64, 16, 16, 16, 1.0, "relu"),  # topk 1: no marginal block, O_l = 0
    (17, 17, 8, 16, 16, 0.1, "softmax"),  # one key block: n = 1
])
def test_torch_path_matches_reference(Lq, Lk, D, bq, bk, topk, fm):
    from turbo_kernels.attention.sla import sla_torch

    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in make_inputs(torch.float32, B=2, H=2, Lq=Lq, Lk=Lk, D=D))
    W, b = (t.requires_grad_() for t in proj(D))
    ref = sla_reference(q, k, v, topk, bq, bk, fm, proj_l=(W, b))
    got = sla_torch(q, k, v, topk, bq, bk, fm, proj_l=(W, b))
    assert_close(got, ref, torch.float32, "O")
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v, W, b), allow_unused=True)
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v, W, b), allow_unused=True)
    for name, a, r in zip(("dq", "dk", "dv", "dW", "db"), g_got, g_ref):
        if r is None or a is None:  # topk 1: proj_l's weight sees no marginal keys in either path
            assert topk == 1.0 and name == "dW"
            continue
        assert_close(a, r, torch.float32, name)
    # no projection: the sparse branch alone; a low-precision input comes back in its dtype
    assert_close(sla_torch(q, k, v, topk, bq, bk, fm), sla_reference(q, k, v, topk, bq, bk, fm), torch.float32, "O_s")
    assert sla_torch(q.detach().half(), k.detach().half(), v.detach().half(), topk, bq, bk, fm).dtype == torch.float16


@pytest.mark.parametrize("change,exc,word", [
    (dict(topk=0.0), ValueError, "topk"),
    (dict(topk=1.01), ValueError, "topk"),
    (dict(block_q=24), ValueError, "block_q"),
    (dict(feature_map="gelu"), ValueError, "feature_map"),
    (dict(v=torch.randn(1, 2, 30, 16)), ValueError, "v must have the shape"),
    (dict(q=torch.randn(2, 40, 16)), ValueError, "q must have shape"),
    (dict(k=torch.randn(1, 2, 40, 8)), ValueError, "agree"),
    (dict(v=torch.randn(1, 2, 40, 16, dtype=torch.float16)), TypeError, "share a dtype"),
    (dict(q=torch.randint(0, 3, (1, 2, 40, 16))), TypeError, "q must have dtype"),
    (dict(proj_weight=torch.zeros(16, 8)), ValueError, "proj_weight"),
    (dict(proj_bias=torch.zeros(8)), ValueError, "proj_bias"),
])
def test_bad_arguments(change, exc, word):
    args = dict(q=torch.randn(1, 2, 40, 16), k=torch.randn(1, 2, 40, 16), v=torch.randn(1, 2, 40, 16),
                proj_weight=torch.zeros(16, 16), proj_bias=torch.zeros(16), topk=0.5, block_q=16, block_k=16,
                feature_map="softmax") | change
    with pytest.raises(exc, match=word):
        sla_attention(**args)
    if "proj" not in next(iter(change)):
        with pytest.raises(exc, match=word):
            sla_reference(**{n: a for n, a in args.items() if not n.startswith("proj")})


def test_bad_kernel_config_names_the_field():
    q = torch.randn(1, 2, 40, 16)
    bm = sla_block_map(q, q, 0.5, 16, 16)
    with pytest.raises(ValueError, match="config.map_select"):
        sparse_attention(q, q, q, bm, replace(CFG_EQUAL, map_select="numpy"))
    with pytest.raises(ValueError, match="config.fwd_block_n"):
        sparse_attention(q, q, q, bm, replace(CFG_EQUAL, fwd_block_n=24))
    with pytest.raises(ValueError, match="config.fwd_rescale_tau"):
        sparse_attention(q, q, q, bm, replace(CFG_EQUAL, fwd_rescale_tau=9.0))


# ---------------------------------------------------------------------------- module wrapper
def test_module_and_registry():
    from turbo_infer.layers.attention import make_attention
    from turbo_infer.layers.sla import SparseLinearAttention

    m = make_attention("sla", 16, topk=0.5, block_q=16, block_k=16)
    assert isinstance(m, SparseLinearAttention)
    assert m.proj_l.weight.dtype == torch.float32 and torch.count_nonzero(m.proj_l.weight) == 0
    m = m.to(torch.bfloat16)
    assert m.proj_l.weight.dtype == torch.float32, "proj_l must stay fp32"
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.bfloat16) for _ in range(3))
    o = m(q, k, v)
    assert o.dtype == torch.bfloat16 and o.shape == q.shape
    # zero proj_l: the output is the block-sparse attention alone
    o_s, _ = sla_reference(q, k, v, 0.5, 16, 16, return_branches=True)
    torch.testing.assert_close(o.float(), o_s.to(torch.bfloat16).float())
    with torch.no_grad():
        m.proj_l.weight.normal_()
    torch.testing.assert_close(m(q, k, v), sla_reference(q, k, v, 0.5, 16, 16, proj_l=m.proj_l))
    with pytest.raises(ValueError, match="topk"):
        SparseLinearAttention(16, topk=0)
    with pytest.raises(ValueError, match="feature_map"):
        SparseLinearAttention(16, feature_map="tanh")
    with pytest.raises(ValueError, match="head dim"):
        m(q[..., :8], k[..., :8], v[..., :8])


# ---------------------------------------------------------------------------------------------- TMA forward
CFG_TMA = replace(CFG_UNFUSED, fwd_tma=True)


def _spy_tma(monkeypatch):
    """Record whether each forward took the descriptor kernel (True) or fell back to the pointer one."""
    import turbo_kernels.attention.sla as sla_mod

    taken = []
    real = sla_mod._launch_tma_forward
    monkeypatch.setattr(sla_mod, "_launch_tma_forward", lambda *a: taken.append(real(*a)) or taken[-1])
    return taken


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layout,D", [("bhld", 32), ("blhd", 32), ("bhld", 24), ("blhd", 24)])
def test_tma_sparse_forward_matches_reference(dtype, layout, D, monkeypatch):
    """fwd_tma: K/V tiles through 2-D tensor descriptors, both token views (contiguous (B, H, L, D), and the
    model's (B, L, H, D) permuted, where a head is a column offset), a ragged key tail (200 = 12.5 blocks of
    16, whose masked rows read the next head's or batch's tokens, or zeros past the end) and a padded head
    dim (24 of 32 columns). Same tolerances as the pointer kernel: the arithmetic is the same."""
    taken = _spy_tma(monkeypatch)
    B, H, L = 2, 3, 200
    if layout == "bhld":
        q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2) for _ in range(3))
    bm = sla_block_map(q, k, 0.3, 32, 16)
    o_s = sparse_attention(q, k, v, bm, CFG_TMA)
    ref_s, _ = sla_reference(q, k, v, 0.3, 32, 16, block_map=bm, return_branches=True)
    assert taken == [True]
    assert_close(o_s, ref_s, dtype, f"O_s (TMA, {layout}, D={D})")
    _, lse_tma, _ = _sparse_forward(q, k, v, bm, CFG_TMA.clamp(32, 16), store_lse=True)
    _, lse_ptr, _ = _sparse_forward(q, k, v, bm, CFG_UNFUSED.clamp(32, 16), store_lse=True)
    torch.testing.assert_close(lse_tma, lse_ptr, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("feature_map,dtype", [("softmax", torch.float16), ("elu", torch.float32)])
def test_tma_inference_forward_with_the_linear_branch(feature_map, dtype, monkeypatch):
    # the whole inference forward (state kernel, marginal GEMMs, TMA sparse kernel, linear epilogue, bias)
    taken = _spy_tma(monkeypatch)
    q, k, v = make_inputs(dtype, Lq=200, Lk=170, D=24)
    W, b = proj(24)
    bm = sla_block_map(q, k, 0.25, 32, 16)
    with torch.no_grad():
        o = sla_attention(q, k, v, W, b, 0.25, 32, 16, feature_map, block_map=bm, config=CFG_TMA)
    ref = sla_reference(q, k, v, 0.25, 32, 16, feature_map, proj_l=(W, b), block_map=bm)
    assert taken == [True]
    assert_close(o, ref, dtype, f"TMA O[{feature_map}]")


def test_tma_falls_back_to_the_pointer_kernel_where_no_descriptor_fits(monkeypatch):
    """No 2-D token view (every other key of a longer tensor), tiles wider than a map block, or the linear
    branch fused into the sparse kernel: the pointer kernel runs, and the result is still the reference's."""
    from turbo_kernels.attention.sla_tma import token_view

    taken = _spy_tma(monkeypatch)
    q, _, _ = make_inputs(torch.float32, Lq=96, D=16)
    k_long, v_long = (torch.randn(1, 2, 192, 16) for _ in range(2))
    k, v = k_long[:, :, ::2], v_long[:, :, ::2]
    assert token_view(k) is None and token_view(k_long) is not None
    bm = sla_block_map(q, k, 0.5, 32, 16)
    ref_s, _ = sla_reference(q, k, v, 0.5, 32, 16, block_map=bm, return_branches=True)
    assert_close(sparse_attention(q, k, v, bm, CFG_TMA), ref_s, torch.float32, "O_s (strided K/V)")
    kc, vc = k.contiguous(), v.contiguous()
    assert_close(sparse_attention(q, kc, vc, bm, replace(CFG_TMA, fwd_block_n=32)), ref_s, torch.float32,
                 "O_s (block_n 32 > block_k 16)")
    W, b = proj(16)
    with torch.no_grad():
        o = sla_attention(q, kc, vc, W, b, 0.5, 32, 16, block_map=bm, config=replace(CFG_TMA, fuse_linear=True))
    assert_close(o, sla_reference(q, kc, vc, 0.5, 32, 16, proj_l=(W, b), block_map=bm), torch.float32, "O (fused)")
    assert taken == [False, False, False]


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("Lq,Lk,D", [(200, 200, 32), (90, 75, 24)])
def test_tma_forward_and_every_gradient(layout, Lq, Lk, D, monkeypatch):
    """fwd_tma + bwd_tma: the sparse forward, the dQ kernel (K/V tiles) and the dK/dV kernel (Q/dO tiles)
    through descriptors, on both token views; ragged query and key tails (the dK/dV kernel's rows past Lq are
    another head's queries there, zeroed through an infinite LSE) and a padded head dim. Every gradient
    against the reference at the fp16 tolerance, and all three kernels must have taken the descriptor path."""
    import turbo_kernels.attention.sla as sla_mod

    described = []
    real = sla_mod.token_descriptor
    monkeypatch.setattr(sla_mod, "token_descriptor", lambda x, *a: described.append(x.shape) or real(x, *a))
    dtype = torch.float16

    def make(L):
        t = torch.randn(2, 2, L, D, dtype=dtype) if layout == "bhld" else torch.randn(2, L, 2, D, dtype=dtype)
        return t if layout == "bhld" else t.transpose(1, 2)

    q, k, v = make(Lq), make(Lk), make(Lk)
    W, b = proj(D)
    bm = sla_block_map(q, k, 0.3, 32, 16)
    ours = [t.detach().requires_grad_() for t in (q, k, v)] + [t.clone().requires_grad_() for t in (W, b)]
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v, W, b)]
    cfg = replace(CFG_UNFUSED, fwd_tma=True, bwd_tma=True)
    o = sla_attention(*ours, 0.3, 32, 16, block_map=bm, config=cfg)
    o_ref = sla_reference(*ref[:3], 0.3, 32, 16, proj_l=(ref[3], ref[4]), block_map=bm)
    assert_close(o, o_ref, dtype, "O")
    g = torch.randn_like(o)
    if layout == "blhd":  # an upstream gradient in the model's layout too
        g = g.transpose(1, 2).contiguous().transpose(1, 2)
    o.backward(g)
    o_ref.backward(g)
    # the training forward (linear branch in its own kernel, O_s kept for the backward) and the backward's
    # two kernels each describe two operands
    assert len(described) == 6, described
    for name, a, r in zip(("dq", "dk", "dv", "dW", "db"), ours, ref):
        scale = 1.0 if name in ("dq", "dk", "dv") else max(1.0, r.grad.abs().max().item())
        assert_close(a.grad / scale, r.grad / scale, dtype, name)
