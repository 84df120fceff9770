"""Tile order of the DiT's tokens for block-sparse attention (turbo_infer.models.token_order): a true
permutation on any grid, invisible to dense attention, visible to SLA, and carried by the model's config
through checkpoints, the merge and the bundles."""
import json

import pytest
import torch

from turbo_infer.models.token_order import check_token_tile, inverse_permutation, tile_permutation, token_tile_arg
from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.models.wan_keys import save_wan_checkpoint
from turbo_train.sla_convert import convert_to_sla

from tiny_wan import TINY, tiny_model  # noqa: E402  (tests/infer/tiny_wan.py)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


def test_divisible_grids_are_ordered_tile_by_tile():
    perm = tile_permutation((4, 4, 4), (2, 2, 2))
    # the first tile: frames 0-1, rows 0-1, columns 0-1 of the raster grid (index f*16 + h*4 + w)
    assert perm[:8].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]
    # the same as reshaping into (tiles, tile) and flattening
    ref = torch.arange(64).view(2, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1)
    assert torch.equal(perm, ref)
    assert torch.equal(tile_permutation((2, 3, 5), (1, 1, 1)), torch.arange(30))  # 1x1x1 tiles: raster order


@pytest.mark.parametrize("grid, tile", [((3, 5, 7), (2, 2, 4)), ((21, 6, 10), (4, 4, 4)), ((1, 1, 3), (4, 2, 2))])
def test_any_grid_gives_a_permutation_and_its_inverse(grid, tile):
    perm = tile_permutation(grid, tile)
    n = grid[0] * grid[1] * grid[2]
    assert sorted(perm.tolist()) == list(range(n))
    inv = inverse_permutation(perm)
    x = torch.randn(2, n, 3)
    assert torch.equal(x[:, perm][:, inv], x)
    # partial tiles at the far edges stay together: the tokens of one tile are consecutive
    f, h, w = grid
    tf, th, tw = tile
    tiles = [(p // (h * w) // tf, p // w % h // th, p % w // tw) for p in perm.tolist()]
    assert tiles == sorted(tiles)


def test_bad_tiles_are_refused_with_the_option_named():
    for bad in ((4, 2), (4, 0, 2), (1.5, 2, 2), "abc", None):
        with pytest.raises(ValueError, match="token_tile must be 3 positive integers"):
            check_token_tile(bad)
    with pytest.raises(ValueError, match="attention_options.token_tile"):
        WanConfig(**{**TINY.to_dict(), "attention_options": {"token_tile": [2, 2]}})
    assert token_tile_arg("4,2,2") == (4, 2, 2)
    with pytest.raises(Exception, match="'4,2'"):
        token_tile_arg("4,2")


def test_dense_attention_does_not_see_the_order():
    """Everything but attention acts per token and RoPE moves with its token: the tiled model is the raster one."""
    raster = tiny_model()
    tiled = tiny_model(attention_options={"token_tile": [2, 2, 2]})
    tiled.load_state_dict(raster.state_dict())
    ctx = torch.randn(2, 5, 384)
    for shape in ((2, 48, 4, 8, 8), (2, 48, 3, 6, 10)):  # a divisible grid and a ragged one
        x = torch.randn(*shape)
        with torch.no_grad():
            a, b = raster(x, torch.tensor([300.0, 900.0]), ctx), tiled(x, torch.tensor([300.0, 900.0]), ctx)
        assert a.abs().max() > 0.1
        # only the summation order inside attention changes: fp32 rounding
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_sla_blocks_follow_the_order():
    """At topk 1 SLA keeps every block (the order cannot matter); at a low topk the blocks it keeps are tiles."""
    dense = tiny_model()
    x, t, ctx = torch.randn(1, 48, 4, 16, 16), torch.tensor([700.0]), torch.randn(1, 5, 384)
    out = {}
    for topk in (1.0, 0.25):
        for tile in (None, [4, 2, 2]):
            m = convert_to_sla(dense, topk=topk, block_q=16, block_k=16, token_tile=tile).eval()
            assert m.config.attention_options.get("token_tile") == tile
            with torch.no_grad():
                out[topk, tile is not None] = m(x, t, ctx)
    torch.testing.assert_close(out[1.0, True], out[1.0, False], atol=1e-5, rtol=1e-5)
    assert (out[0.25, True] - out[0.25, False]).abs().max() > 1e-3


def test_the_order_travels_through_checkpoint_merge_and_bundle(tmp_path):
    from turbo_infer import bundle as B
    from turbo_train.export import export_bundle
    from turbo_train.merge import merge_checkpoints

    teacher = tiny_model()
    sla = convert_to_sla(teacher, topk=0.25, block_q=16, block_k=16, token_tile=[4, 2, 2])
    with torch.no_grad():
        for layer in sla.blocks:
            layer.self_attn.attn.proj_l.weight.normal_(std=0.05)
    paths = {n: tmp_path / f"{n}.safetensors" for n in ("teacher", "student", "sla")}
    save_wan_checkpoint(teacher, paths["teacher"])
    save_wan_checkpoint(tiny_model(seed=1), paths["student"])
    save_wan_checkpoint(sla, paths["sla"])
    assert WanModel.from_pretrained(paths["sla"]).config.attention_options["token_tile"] == [4, 2, 2]
    merged, _ = merge_checkpoints(paths["student"], paths["sla"], paths["teacher"], tmp_path / "merged.safetensors")
    merged_model = WanModel.from_pretrained(merged)
    assert merged_model.config.attention_options["token_tile"] == [4, 2, 2]
    out = export_bundle(merged, "cpu", tmp_path / "bundles", steps=2, progress=False)
    manifest = json.loads((out / B.MANIFEST).read_text())
    assert manifest["attention"]["token_tile"] == [4, 2, 2]
    model, _ = B.load_transformer(out, "cpu")
    assert model.config.attention_options["token_tile"] == [4, 2, 2]
    x, t, ctx = torch.randn(1, 48, 4, 16, 16), torch.tensor([700.0]), torch.randn(1, 5, 384)
    with torch.no_grad():  # the bundle computes what the merged model computes (cpu bundle: fp32 / bf16 weights)
        ref = merged_model.eval()(x, t, ctx)
        got = model(x.to(next(model.parameters()).dtype), t, ctx.to(next(model.parameters()).dtype)).float()
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)
    # a manifest with a bad tile is refused, naming the field
    manifest["attention"]["token_tile"] = [4, 2]
    with pytest.raises(B.BundleError, match="field 'attention.token_tile'"):
        B.validate_manifest(manifest)
