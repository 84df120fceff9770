"""Wan DiT: forward parity with diffusers' WanTransformer3DModel, key layouts, loading errors."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from turbo_infer.models.wan import WAN_CONFIGS, WanConfig, WanModel, get_config
from turbo_infer.models.wan_keys import (
    diffusers_to_official,
    load_wan_state_dict,
    official_to_diffusers,
    save_wan_checkpoint,
)

diffusers = pytest.importorskip("diffusers")

TINY = dict(dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=20, in_channels=4, out_channels=4, freq_dim=32)


def tiny_diffusers_model():
    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
        text_dim=20, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64,
    ).eval()
    with torch.no_grad():  # randomise every parameter (biases and norms start at 0/1 otherwise)
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def inputs(B=2, F=3, H=6, W=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, F, H, W, generator=g)
    t = torch.tensor([999.0, 137.5])[:B]
    ctx = torch.randn(B, 7, 20, generator=g)
    return x, t, ctx


def test_forward_matches_diffusers_both_layouts(tmp_path):
    ref = tiny_diffusers_model()
    x, t, ctx = inputs()
    with torch.no_grad():
        expected = ref(x, t, ctx, return_dict=False)[0]
    sd_diffusers = ref.state_dict()
    # diffusers layout, loaded through a directory with config.json (the diffusers way)
    ref.save_pretrained(tmp_path / "diffusers")
    ours_d = WanModel.from_pretrained(tmp_path / "diffusers").eval()
    # official layout, single file, explicit config
    save_file({k: v.contiguous() for k, v in diffusers_to_official(sd_diffusers).items()}, tmp_path / "official.safetensors")
    ours_o = WanModel.from_pretrained(tmp_path / "official.safetensors", config=WanConfig(**TINY)).eval()
    with torch.no_grad():
        for ours in (ours_d, ours_o):
            out = ours(x, t, ctx)
            assert out.shape == expected.shape
            err = (out - expected).abs().max().item()
            assert err <= 1e-5, f"max abs error vs diffusers {err:.3g}"


def test_key_mapping_round_trip():
    ref = tiny_diffusers_model()
    sd = ref.state_dict()
    official = diffusers_to_official(sd)
    ours = WanModel(WanConfig(**TINY))
    assert set(official) == set(ours.state_dict()), set(official) ^ set(ours.state_dict())
    assert official_to_diffusers(official).keys() == sd.keys()


def test_sharded_index_and_metadata_config(tmp_path):
    model = WanModel(WanConfig(**TINY)).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"m-00001-of-00002.safetensors": keys[:half], "m-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    loaded = WanModel.from_pretrained(tmp_path / "m.safetensors.index.json", config=WanConfig(**TINY))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # our own writer stores the config in the safetensors metadata: no config needed to load
    save_wan_checkpoint(model, tmp_path / "own.safetensors")
    again = WanModel.from_pretrained(tmp_path / "own.safetensors")
    assert again.config == model.config
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "own.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not private (0600)
    assert not (tmp_path / "own.safetensors.tmp").exists()
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx), model(x, t, ctx))


def test_loading_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        WanModel.from_pretrained(tmp_path / "nope.safetensors")
    bad = tmp_path / "trunc.safetensors"
    model = WanModel(WanConfig(**TINY))
    save_wan_checkpoint(model, bad)
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        WanModel.from_pretrained(bad)
    noconf = tmp_path / "noconf.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, noconf)
    with pytest.raises(ValueError, match="match no preset"):
        WanModel.from_pretrained(noconf)
    with pytest.raises(ValueError, match="unknown Wan config"):
        get_config("wan9")


def test_an_sla_checkpoint_without_its_proj_l_is_refused_but_a_dense_one_converts(tmp_path):
    dense = tmp_path / "dense.safetensors"
    save_wan_checkpoint(WanModel(WanConfig(**TINY)), dense)
    sla = WanModel.from_pretrained(dense, attention="sla", attention_options={"topk": 0.5, "block_q": 16, "block_k": 16})
    proj = {n: p for n, p in sla.named_parameters() if ".proj_l." in n}
    assert proj and all(float(p.abs().sum()) == 0 for p in proj.values())  # a dense checkpoint: untrained SLA
    state = {k: v.contiguous() for k, v in sla.state_dict().items() if ".proj_l." not in k}
    broken = tmp_path / "sla_without_proj_l.safetensors"
    save_file(state, str(broken), metadata={"wan_config": json.dumps(sla.config.to_dict())})
    with pytest.raises(RuntimeError, match="proj_l"):  # stored as SLA: its trained projection must be there
        WanModel.from_pretrained(broken)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="num_heads"):
        WanConfig(dim=50, ffn_dim=8, num_heads=3, num_layers=1)
    assert WAN_CONFIGS["wan2.1-1.3b"].head_dim == 128 and WAN_CONFIGS["wan2.1-14b"].head_dim == 128
    n = sum(p.numel() for p in WanModel("toy").parameters())
    assert 6e6 < n < 8e6, n  # 7.12M: shipped as bf16, 14 MB (the package keeps teacher + judge under 25 MB)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = WanModel(WanConfig(**TINY))
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.1)
    x, t, ctx = inputs()
    m(x, t, ctx).square().mean().backward()
    g1 = {n: p.grad.clone() for n, p in m.named_parameters()}
    for setting, blocks in ((True, 2), (1, 1), (5, 2), (0, 0)):  # every block, the first one, capped, none
        m.zero_grad()
        m.enable_activation_checkpointing(setting)
        assert m.checkpointed_blocks() == blocks
        m(x, t, ctx).square().mean().backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, g1[n], rtol=1e-5, atol=1e-6, msg=f"{setting}: {n}")
    with pytest.raises(ValueError, match="number of blocks"):
        m.enable_activation_checkpointing(-1)


def test_partial_checkpointing_recomputes_only_the_first_blocks(monkeypatch):
    """activation checkpointing N: torch.utils.checkpoint wraps exactly the first N blocks, and only with grad."""
    import turbo_infer.models.wan as wan

    calls = []
    real = wan.checkpoint
    monkeypatch.setattr(wan, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    m = WanModel(WanConfig(**{**TINY, "num_layers": 3})).enable_activation_checkpointing(2)
    x, t, ctx = inputs()
    m(x, t, ctx).sum().backward()
    assert calls == [m.blocks[0], m.blocks[1]]
    calls.clear()
    with torch.no_grad():
        m(x, t, ctx)
    assert calls == []


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that actually run (ops a checkpoint serves from its cache do not reach it)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_attention_checkpointing_recomputes_no_attention(dtype):
    """policy keep_attention: the same gradients as no checkpointing, and backward runs no attention
    forward (under "full" it reruns each block's self- and cross-attention)."""
    import turbo_infer.models.wan as wan

    torch.manual_seed(0)
    m = WanModel(WanConfig(**TINY)).to(dtype)
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.1)
    x, t, ctx = (a.to(dtype) if a.is_floating_point() else a for a in inputs())
    m(x, t, ctx).square().mean().backward()
    g0 = {n: p.grad.clone() for n, p in m.named_parameters()}
    attention_forwards = {}
    for policy in ("full", "keep_attention"):
        m.zero_grad()
        m.enable_activation_checkpointing(True, policy)
        assert m.checkpoint_policy == policy and m.checkpointed_blocks() == 2
        loss = m(x, t, ctx).square().mean()
        with _OpCounter() as counter:
            loss.backward()
        attention_forwards[policy] = sum(op in wan.ATTENTION_OPS for op in counter.ops)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, g0[n], rtol=1e-5, atol=1e-6, msg=f"{policy}: {n}")
    assert attention_forwards == {"full": 4, "keep_attention": 0}  # 2 blocks x (self + cross)
    m.enable_activation_checkpointing(1)  # the policy stays when only the block count changes
    assert m.checkpoint_policy == "keep_attention"
    with pytest.raises(ValueError, match="checkpoint policy"):
        m.enable_activation_checkpointing(True, "attention_only")


def test_fused_norm_rope_path_gives_the_eager_outputs(monkeypatch):
    """The inference path through turbo::norm_rope and turbo::rms_norm (the Triton kernels, here in the CPU
    interpreter) equals the eager RMSNorm + RoPE path; CPU tensors never take it on their own."""
    import turbo_infer.models.wan as wan

    torch.manual_seed(0)
    m = WanModel(WanConfig(**TINY)).eval()
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.1)
    x, t, ctx = inputs()
    assert not wan.fused_norm_rope_applies(x)  # CPU: eager
    calls = []
    real = wan.fused_norm_rope_applies
    with torch.no_grad():
        eager = m(x, t, ctx)
        monkeypatch.setattr(wan, "fused_norm_rope_applies", lambda t: calls.append(1) or not torch.is_grad_enabled())
        fused = m(x, t, ctx)
    assert len(calls) == 3 * TINY["num_layers"]  # self-attention's q/k kernel, cross-attention's q and k norms
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(wan, "fused_norm_rope_applies", real)


def test_forward_mode_jvp_through_model():
    """rCM needs forward-mode AD through the whole DiT (SDPA math backend on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = WanModel(WanConfig(**TINY)).eval()
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.1)
    x, t, ctx = inputs(B=1)
    tx = torch.randn_like(x)
    tt = torch.ones_like(t)
    f = lambda x_, t_: m(x_, t_, ctx)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        _, jvp = torch.func.jvp(f, (x, t), (tx, tt))
        eps = 1e-3
        fd = (f(x + eps * tx, t + eps * tt) - f(x - eps * tx, t - eps * tt)) / (2 * eps)
    # fp32 central differences carry ~1e-3 relative noise at this eps: compare in norm
    rel = ((jvp - fd).norm() / fd.norm()).item()
    assert rel < 1e-2, rel


def test_x0_prediction_returns_the_implied_velocity(tmp_path):
    """prediction="x0": same weights, the head's output read as x̂0, forward returns (x - x̂0) / max(s, 0.05)."""
    torch.manual_seed(0)
    vel = WanModel(WanConfig(**TINY)).eval()
    with torch.no_grad():
        vel.head.head.weight.normal_(std=0.1)
    x0m = WanModel(WanConfig(**TINY, prediction="x0")).eval()
    x0m.load_state_dict(vel.state_dict())
    x, _, ctx = inputs()
    t = torch.tensor([999.0, 20.0])  # s = 0.999 and s = 0.02 (below the 0.05 clip)
    with torch.no_grad():
        head_out, v = vel(x, t, ctx), x0m(x, t, ctx)
    torch.testing.assert_close(v[0], (x[0] - head_out[0]) / 0.999)
    torch.testing.assert_close(v[1], (x[1] - head_out[1]) / 0.05)
    # a sampler's last Euler step x - s·v lands exactly on x̂0 (s >= 0.05)
    torch.testing.assert_close(x[0] - 0.999 * v[0], head_out[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        WanConfig(**TINY, prediction="eps")


def test_checkpoint_keeps_its_prediction(tmp_path):
    """A preset passed as `config` does not turn an x0 checkpoint into a velocity model; an override does."""
    model = WanModel(WanConfig(**TINY, prediction="x0"))
    save_wan_checkpoint(model, tmp_path / "x0.safetensors")
    assert WanModel.from_pretrained(tmp_path / "x0.safetensors", config=WanConfig(**TINY)).config.prediction == "x0"
    forced = WanModel.from_pretrained(tmp_path / "x0.safetensors", config=WanConfig(**TINY), prediction="velocity")
    assert forced.config.prediction == "velocity"
    # weights without a stored config keep the caller's
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "bare.safetensors")
    bare = WanModel.from_pretrained(tmp_path / "bare.safetensors", config=WanConfig(**TINY, prediction="x0"))
    assert bare.config.prediction == "x0"


def test_checkpoint_keeps_its_network_and_says_so(tmp_path):
    """A recipe's preset does not reshape a checkpoint that stores its config (e.g. a teacher trained with
    another patch size): the stored network wins, with a warning naming what differed; the caller's
    attention backend and explicit overrides still apply."""
    model = WanModel(WanConfig(**TINY, patch_size=(2, 2, 1)))
    save_wan_checkpoint(model, tmp_path / "p221.safetensors")
    with pytest.warns(UserWarning, match=r"p221.safetensors: the checkpoint's network \(patch_size=\(2, 2, 1\)\)"):
        loaded = WanModel.from_pretrained(tmp_path / "p221.safetensors", config=WanConfig(**{**TINY, "attention": "sla"}))
    assert loaded.config.patch_size == (2, 2, 1) and loaded.config.attention == "sla"
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t)
    # nothing differs, or the caller overrides the field explicitly (its own decision, here one the
    # weights cannot fit): no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WanModel.from_pretrained(tmp_path / "p221.safetensors", config=WanConfig(**TINY, patch_size=(2, 2, 1)))
        with pytest.raises(RuntimeError, match="size mismatch"):
            WanModel.from_pretrained(tmp_path / "p221.safetensors", config=WanConfig(**TINY), patch_size=(1, 2, 2))
