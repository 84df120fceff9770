"""Block map of SLA: Triton pooling path vs the pure-torch reference, inverted table, errors.

Runs on the CPU interpreter (TRITON_INTERPRET=1, set in conftest). Tolerances:
    float32 pooled means  -> (atol 1e-5, rtol 1e-5): same fp32 sums, only the order differs
    float16 pooled means  -> (atol 1e-3, rtol 1e-3): both paths upcast the fp16 inputs to fp32
Selected blocks are compared exactly: on continuous random data the gaps between block logits
(~1e-2) are far above the fp32 rounding differences of the two pooling orders (~1e-7).
"""
import pytest
import torch

from turbo_kernels.attention.blockmap import (BlockMap, pool_blocks, pool_blocks_reference, sla_block_map,
                                              sla_block_map_reference)

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L,block", [(200, 32), (200, 16), (64, 64), (5, 16)])
def test_pool_matches_reference(dtype, L, block):
    x = torch.randn(1, 2, L, 24, dtype=dtype)
    got, ref = pool_blocks(x, block), pool_blocks_reference(x, block)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    # the ragged tail block is the mean of its valid tokens only
    tail = x[:, :, (got.shape[2] - 1) * block:].float().mean(dim=2)
    torch.testing.assert_close(got[:, :, -1], tail, atol=atol, rtol=rtol)


def test_pool_noncontiguous_layout():
    x = torch.randn(1, 200, 2, 32).transpose(1, 2)  # (B, H, L, D) view of a (B, L, H, D) tensor
    torch.testing.assert_close(pool_blocks(x, 32), pool_blocks_reference(x, 32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("topk", [0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_map_matches_reference(topk, dtype):
    q = torch.randn(2, 2, 200, 32, dtype=dtype)
    k = torch.randn(2, 2, 200, 32, dtype=dtype) + 3.0  # a large shared offset: smoothing must not matter
    bm, ref = sla_block_map(q, k, topk, 32, 16), sla_block_map_reference(q, k, topk, 32, 16)
    assert (bm.num_q_blocks, bm.num_k_blocks, bm.n) == (7, 13, max(1, int(topk * 13)))
    assert bm.lut.dtype == torch.int32 and bm.lut.shape == (2, 2, 7, bm.n)
    assert torch.equal(bm.lut, ref.lut)
    assert torch.all(bm.lut[..., 1:] > bm.lut[..., :-1]), "lut must be strictly ascending"


def test_block_map_selects_top_logits():
    # a planted structure: query block i is aligned with key block (2i) only
    D, bq, bk = 32, 32, 16
    Nq, Nk = 4, 8
    centers = torch.randn(Nk, D) * 4
    k = centers.repeat_interleave(bk, 0)[None, None] + 0.1 * torch.randn(1, 1, Nk * bk, D)
    q = centers[0::2].repeat_interleave(bq, 0)[None, None] + 0.1 * torch.randn(1, 1, Nq * bq, D)
    bm = sla_block_map(q, k, 1 / Nk, bq, bk)
    assert bm.n == 1
    assert bm.lut[0, 0, :, 0].tolist() == [0, 2, 4, 6]


def test_inverse_is_transpose_of_lut():
    q, k = torch.randn(2, 3, 200, 16), torch.randn(2, 3, 150, 16)
    bm = sla_block_map(q, k, 0.3, 32, 16)
    offsets, qidx = bm.inverse()
    assert offsets.shape == (2, 3, bm.num_k_blocks + 1) and qidx.shape == (2, 3, bm.num_q_blocks * bm.n)
    dense = bm.dense()  # (B, H, Nq, Nk)
    for b in range(2):
        for h in range(3):
            for j in range(bm.num_k_blocks):
                s, e = offsets[b, h, j].item(), offsets[b, h, j + 1].item()
                expect = torch.nonzero(dense[b, h, :, j]).flatten().tolist()
                assert qidx[b, h, s:e].tolist() == expect
    assert bm.inverse() is bm.inverse()  # cached


def test_token_mask_shape_and_blocks():
    q, k = torch.randn(1, 1, 70, 16), torch.randn(1, 1, 45, 16)
    bm = sla_block_map_reference(q, k, 0.5, 32, 16)
    m = bm.token_mask()
    assert m.shape == (1, 1, 70, 45)
    assert m[0, 0, 0].view(-1).sum() == sum(min(16, 45 - 16 * j) for j in bm.lut[0, 0, 0].tolist())


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(topk=0.0), ValueError, "topk"),
    (dict(topk=1.5), ValueError, "topk"),
    (dict(topk="a"), TypeError, "topk"),
    (dict(block_q=48), ValueError, "block_q"),
    (dict(block_k=8), ValueError, "block_k"),
])
def test_bad_arguments(kwargs, exc, word):
    q = k = torch.randn(1, 1, 40, 16)
    args = dict(topk=0.5, block_q=32, block_k=16) | kwargs
    with pytest.raises(exc, match=word):
        sla_block_map(q, k, **args)


def test_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="q must have shape"):
        sla_block_map(torch.randn(2, 40, 16), torch.randn(1, 2, 40, 16), 0.5)
    with pytest.raises(ValueError, match="agree"):
        sla_block_map(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 32), 0.5)
    with pytest.raises(TypeError, match="k must have dtype"):
        sla_block_map(torch.randn(1, 2, 40, 16), torch.ones(1, 2, 40, 16, dtype=torch.int32), 0.5)


# ----------------------------------------------------------------------------- fused top-n selection


@pytest.mark.parametrize("R,Nk,n", [(6, 512, 51), (5, 37, 1), (4, 37, 36), (3, 100, 10), (2, 1182, 118)])
def test_topk_select_matches_torch(R, Nk, n):
    """The fused kernel picks the same set as torch.topk (continuous data: no ties), ascending."""
    from turbo_kernels.attention.blockmap import topk_select

    x = torch.randn(R, Nk) * 3 - 1  # negative and positive logits: the float -> int order must hold for both
    got = topk_select(x, n)
    want = torch.topk(x, n, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    assert got.dtype == torch.int32 and got.shape == (R, n)
    assert torch.equal(got, want)


def test_topk_select_ties_go_to_the_lower_index_and_exactly_n_are_taken():
    from turbo_kernels.attention.blockmap import topk_select

    x = torch.tensor([[1.0, 5.0, 3.0, 5.0, 3.0, 3.0, -2.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [-0.0, 0.0, -1.0, 2.0, -3.0, 2.0, 2.0, 1e-30]])
    got = topk_select(x, 4).tolist()
    assert got[0] == [1, 2, 3, 4]  # both 5s, then the first two of the three 3s
    assert got[1] == [0, 1, 2, 3]  # all tied
    assert got[2] == [3, 5, 6, 7]  # three 2s, then 1e-30 above both zeros
    with pytest.raises(ValueError, match="n must be in 1..8"):
        topk_select(x, 9)
    with pytest.raises(ValueError, match="float32"):
        topk_select(x.double(), 2)


@pytest.mark.parametrize("topk", [0.05, 0.3])
def test_block_map_with_the_fused_selection_is_the_same_map(topk):
    q, k = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    a, b = sla_block_map(q, k, topk, 32, 16), sla_block_map(q, k, topk, 32, 16, select="triton")
    assert torch.equal(a.lut, b.lut) and a.n == b.n
    with pytest.raises(ValueError, match="select must be one of"):
        sla_block_map(q, k, topk, 32, 16, select="heap")


@pytest.mark.parametrize("select", ["torch", "triton"])
def test_block_map_under_bf16_autocast_is_the_fp32_map(select):
    """Training runs the block map inside a bf16 autocast region: the selection logits stay fp32 (the
    fused selection takes float32 only; a GPU SLA fine-tune failed on exactly this), same map as outside."""
    q, k = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    ref = sla_block_map(q, k, 0.2, 32, 16, select=select)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = sla_block_map(q.bfloat16(), k.bfloat16(), 0.2, 32, 16, select=select)
    assert torch.equal(got.lut, sla_block_map(q.bfloat16(), k.bfloat16(), 0.2, 32, 16, select=select).lut)
    assert (got.lut == ref.lut).float().mean() > 0.9  # bf16 inputs may move near-ties only
