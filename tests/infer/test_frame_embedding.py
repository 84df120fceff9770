"""WanConfig.frame_embed_len: a learned embedding of the latent frame index (not in Wan; the toy codec,
unlike Wan's causal VAE, gives the DiT nothing time-asymmetric). It starts at zero, so adding it to a
trained checkpoint changes nothing until it trains, and it makes the network tell a video from the same
video played backwards."""
import pytest
import torch

from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.models.wan_keys import save_wan_checkpoint

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=24, in_channels=12, out_channels=12,
                 prediction="x0")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = WanModel(WanConfig(**{**TINY.to_dict(), **overrides})).eval()
    for name, p in model.named_parameters():  # Wan zeroes the head: give every weight some signal
        if name != "frame_embedding":
            torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(frames=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, frames, 8, 8, generator=g)
    return x, torch.tensor([700.0, 300.0]), torch.randn(2, 5, 24, generator=g)


def reversal_gap(model, x, t, ctx) -> float:
    """‖f(R x) − R f(x)‖ / ‖f(x)‖ for R = play the latent frames backwards."""
    with torch.no_grad():
        fx = model(x, t, ctx)
        return float((model(x.flip(2), t, ctx) - fx.flip(2)).norm() / fx.norm())


def test_a_checkpoint_without_it_loads_with_a_zero_embedding_and_the_same_function(tmp_path):
    base = tiny()
    path = tmp_path / "base.safetensors"
    save_wan_checkpoint(base, path)
    grown = WanModel.from_pretrained(path, frame_embed_len=6).eval()  # strict: the new row table is allowed
    assert grown.config.frame_embed_len == 6 and torch.equal(grown.frame_embedding, torch.zeros(6, 32))
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(grown(x, t, ctx), base(x, t, ctx))
    assert not hasattr(WanModel.from_pretrained(path), "frame_embedding")  # no override: the checkpoint's own network


def test_a_trained_embedding_breaks_the_time_reversal_symmetry_and_round_trips(tmp_path):
    model = tiny(frame_embed_len=4)
    x, t, ctx = inputs()
    before = reversal_gap(model, x, t, ctx)
    with torch.no_grad():
        model.frame_embedding.copy_(torch.linspace(-1, 1, 4)[:, None] * torch.randn(1, 32))
    after = reversal_gap(model, x, t, ctx)
    # RoPE's sine terms already break the symmetry a little (before > 0); a frame embedding of the size
    # the tokens have (|row| ~ 1 vs patch tokens ~ 1) changes every output by O(1)
    assert after > 5 * before and after > 0.1, (before, after)
    path = tmp_path / "fe.safetensors"
    save_wan_checkpoint(model, path)
    again = WanModel.from_pretrained(path).eval()  # the stored config carries frame_embed_len
    assert again.config.frame_embed_len == 4 and torch.equal(again.frame_embedding, model.frame_embedding)
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx), model(x, t, ctx))


def test_more_frames_than_rows_and_a_negative_length_are_refused():
    model = tiny(frame_embed_len=2)
    with pytest.raises(ValueError, match="frame_embed_len"):
        model(*inputs(frames=4))
    with pytest.raises(ValueError, match="frame_embed_len"):
        WanConfig(**{**TINY.to_dict(), "frame_embed_len": -1})


def test_a_recipe_override_adds_it_to_a_loaded_checkpoint(tmp_path):
    from turbo_train.methods.flow_matching import build_wan_model
    from turbo_train.recipe import ModelConfig

    path = tmp_path / "base.safetensors"
    save_wan_checkpoint(tiny(), path)
    cfg = ModelConfig(preset="toy", checkpoint=str(path), overrides={"prediction": "x0", "frame_embed_len": 8, "space_embed_len": 16},
                      compile=False)
    with pytest.warns(UserWarning, match="dim=32"):  # the checkpoint's network replaces the toy preset's
        model = build_wan_model(cfg)
    assert model.config.frame_embed_len == 8 and model.config.dim == 32 and model.frame_embedding.requires_grad
    assert model.config.space_embed_len == 16 and model.row_embedding.requires_grad and model.col_embedding.requires_grad


def test_a_checkpoint_that_claims_one_but_lacks_the_tensor_is_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    model = tiny(frame_embed_len=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "frame_embedding"}
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path), metadata={"wan_config": json.dumps(model.config.to_dict())})
    with pytest.raises(RuntimeError, match="frame_embedding"):
        WanModel.from_pretrained(path)



def test_row_and_column_tables_load_onto_a_checkpoint_without_them_and_make_outputs_place_dependent(tmp_path):
    """WanConfig.space_embed_len: zero tables added to a trained checkpoint change nothing; trained ones
    break the network's translation equivariance (a RoPE-only DiT computes nearly the same thing for a
    shifted input, shifted), and they round-trip through a checkpoint."""
    base = tiny()
    path = tmp_path / "base.safetensors"
    save_wan_checkpoint(base, path)
    grown = WanModel.from_pretrained(path, frame_embed_len=4, space_embed_len=4).eval()
    assert torch.equal(grown.row_embedding, torch.zeros(4, 32)) and torch.equal(grown.col_embedding, torch.zeros(4, 32))
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(grown(x, t, ctx), base(x, t, ctx))

    def roll_gap(model) -> float:  # columns rolled by one token (2 latent cells): ‖f(S x) − S f(x)‖ / ‖f(x)‖
        with torch.no_grad():
            fx = model(x, t, ctx)
            return float((model(x.roll(2, dims=4), t, ctx) - fx.roll(2, dims=4)).norm() / fx.norm())

    before = roll_gap(grown)
    with torch.no_grad():
        grown.col_embedding.copy_(torch.linspace(-1, 1, 4)[:, None] * torch.randn(1, 32))
    after = roll_gap(grown)
    assert after > 2 * before and after > 0.1, (before, after)  # (RoPE and the wrap-around give `before` > 0)
    path2 = tmp_path / "grown.safetensors"
    save_wan_checkpoint(grown, path2)
    again = WanModel.from_pretrained(path2).eval()  # the stored config carries both tables
    assert again.config.space_embed_len == 4 and torch.equal(again.col_embedding, grown.col_embedding)
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx), grown(x, t, ctx))
    with pytest.raises(ValueError, match="space_embed_len"):
        again(torch.randn(2, 12, 4, 12, 12), t, ctx)  # a 6 x 6 token grid: more rows than the tables have
    with pytest.raises(ValueError, match="space_embed_len"):
        WanConfig(**{**TINY.to_dict(), "space_embed_len": -1})


def test_a_preset_loads_a_checkpoint_with_tables_quietly_but_still_warns_on_a_real_mismatch(tmp_path):
    """A preset has no tables (0): a checkpoint's tables are an addition, not a conflict — the README job
    loads the shipped toy teacher (8 + 16 rows) under the toy preset at every stage. A different shape
    still warns, naming the field."""
    import warnings

    model = tiny(frame_embed_len=4, space_embed_len=4)
    path = tmp_path / "tables.safetensors"
    save_wan_checkpoint(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = WanModel.from_pretrained(path, config=TINY)
    assert quiet.config.frame_embed_len == 4 and torch.equal(quiet.row_embedding, model.row_embedding)
    with pytest.warns(UserWarning, match=r"frame_embed_len=4"):  # a config that names other tables: told
        WanModel.from_pretrained(path, config=WanConfig(**{**TINY.to_dict(), "frame_embed_len": 2}))
    with pytest.warns(UserWarning, match=r"ffn_dim=64"):
        WanModel.from_pretrained(path, config=WanConfig(**{**TINY.to_dict(), "ffn_dim": 48}))
