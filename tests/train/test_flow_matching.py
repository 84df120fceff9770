"""FlowMatchingModule and its pure pieces: flow-time sampling, caption dropout, the rectified-flow
loss, the LR schedule, the EMA schedules, training on a fixed batch, and the EMA export that
`WanModel.from_pretrained` loads without a config. Tiny DiT (width 32, 2 blocks) and a fake text
encoder, so everything runs in seconds on the CPU."""
from __future__ import annotations

import math

import pytest
import torch

from turbo_infer.models.wan import WanModel
from turbo_infer.samplers import shift_time
from turbo_train import ema as ema_lib
from turbo_train.methods.batching import video_to_model_space
from turbo_train.methods.flow_matching import (
    FlowMatchingModule,
    drop_captions,
    lr_multiplier,
    rectified_flow_loss,
    sample_time,
)
from turbo_train.recipe import FlowMatchingConfig, recipe_from_dict
from fakes import FakeTextEncoder

TINY = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on 2 shared cores: tests/conftest.py


def tiny_recipe(**sections):
    data = {"model": {"overrides": dict(TINY)}, **sections}
    return recipe_from_dict(data)


def toy_batch(n: int = 4, frames: int = 2):
    from turbo_train.toyworld.generator import generate_sample

    samples = [generate_sample(i) for i in range(n)]
    video = torch.stack([torch.from_numpy(s.video[:frames]) for s in samples])  # (B, F, 64, 64, 3) uint8
    return {"video": video, "caption": [s.caption for s in samples]}


# ----------------------------------------------------------------------------- pure pieces


def test_logit_normal_time():
    cfg = FlowMatchingConfig(logit_mean=0.0, logit_std=1.0)
    s = sample_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and s.shape == (20000,)
    assert (s > 0).all() and (s < 1).all()
    logit = torch.log(s / (1 - s))
    # mean and std of 20000 N(0, 1) draws: standard errors 0.007 and 0.005; 4 sigma bounds
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    s2 = sample_time(20000, FlowMatchingConfig(logit_mean=1.0, logit_std=0.5), generator=torch.Generator().manual_seed(0))
    assert abs(s2.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01


def test_shifted_uniform_time():
    cfg = FlowMatchingConfig(time_distribution="shifted_uniform", shift=3.0)
    s = sample_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    assert (s >= 0).all() and (s < 1).all()
    # u ~ U[0, 1) and the shift is monotone, so P(s <= shift(q)) = q; binomial std 0.0035 -> 0.015 bound
    for q in (0.1, 0.5, 0.9):
        frac = (s <= shift_time(torch.tensor(q), 3.0)).float().mean().item()
        assert abs(frac - q) < 0.015, (q, frac)
    s1 = sample_time(20000, FlowMatchingConfig(time_distribution="shifted_uniform", shift=1.0),
                     generator=torch.Generator().manual_seed(0))
    assert abs(s1.mean().item() - 0.5) < 0.01  # shift 1 = plain uniform


def test_high_noise_mixture_time():
    """high_noise_fraction: that share of the times from logit-normal(2.5, 0.5), the rest as before."""
    base = FlowMatchingConfig(logit_mean=0.8, logit_std=1.0)
    mixed = FlowMatchingConfig(logit_mean=0.8, logit_std=1.0, high_noise_fraction=0.3)
    s0 = sample_time(20000, base, generator=torch.Generator().manual_seed(0))
    s = sample_time(20000, mixed, generator=torch.Generator().manual_seed(0))
    # P(s > 0.95) = P(logit > 2.944): base N(0.8, 1) 0.0160, high N(2.5, 0.5) 0.1870, so the mixture has
    # 0.7 * 0.0160 + 0.3 * 0.1870 = 0.0673 (binomial std of 20000 draws 0.0018: 0.008 bound is > 4 sigma)
    assert abs((s0 > 0.95).float().mean().item() - 0.0160) < 0.004
    assert abs((s > 0.95).float().mean().item() - 0.0673) < 0.008
    with pytest.raises(ValueError, match="high_noise_fraction"):
        FlowMatchingConfig(high_noise_fraction=1.5)
    with pytest.raises(ValueError, match="high_noise_logit_std"):
        FlowMatchingConfig(high_noise_logit_std=0.0)


def test_min_time_squeezes_the_draw_into_the_expert_range():
    """min_time 0.9 with a plain uniform draw: s uniform on [0.9, 1) (a high-noise expert's times)."""
    cfg = FlowMatchingConfig(time_distribution="shifted_uniform", shift=1.0, min_time=0.9)
    s = sample_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    base = sample_time(20000, FlowMatchingConfig(time_distribution="shifted_uniform", shift=1.0),
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s, 0.9 + 0.1 * base)  # the same draw, mapped
    assert s.min() >= 0.9 and s.max() < 1.0 and abs(s.mean().item() - 0.95) < 0.001  # std of the mean 2e-4
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_time"):
            FlowMatchingConfig(min_time=bad)


def test_caption_dropout_rate_and_content():
    B, p = 20000, 0.1
    ctx = torch.randn(B, 3, 4)
    empty = torch.full((1, 3, 4), 7.0)
    out, dropped = drop_captions(ctx, empty, p, generator=torch.Generator().manual_seed(0))
    # binomial(20000, 0.1): std 0.0021 -> a 0.009 bound is > 4 sigma
    assert abs(dropped.float().mean().item() - p) < 0.009
    assert torch.equal(out[dropped], empty.expand(int(dropped.sum()), 3, 4))
    assert torch.equal(out[~dropped], ctx[~dropped])
    assert FlowMatchingConfig().caption_dropout == 0.1  # the documented default
    none, d0 = drop_captions(ctx[:100], empty, 0.0)
    assert not d0.any() and torch.equal(none, ctx[:100])


def test_loss_is_zero_for_the_exact_velocity_and_sees_the_right_inputs():
    x0, eps = torch.randn(3, 2, 1, 2, 2), torch.randn(3, 2, 1, 2, 2)
    s = torch.tensor([0.1, 0.5, 0.9])
    seen = {}

    def oracle(x_s, timestep, context):
        seen.update(x_s=x_s, timestep=timestep, context=context)
        return eps - x0

    loss = rectified_flow_loss(oracle, x0, torch.zeros(3, 1, 4), s, eps)
    assert loss.shape == (3,) and torch.allclose(loss, torch.zeros(3))
    assert torch.allclose(seen["x_s"], (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps)
    assert torch.allclose(seen["timestep"], 1000 * s)
    # a zero prediction costs E(eps - x0)^2 per sample
    zero = rectified_flow_loss(lambda x_s, timestep, context: torch.zeros_like(x_s), x0, None, s, eps)
    assert torch.allclose(zero, (eps - x0).pow(2).flatten(1).mean(1))


def test_lr_schedule():
    f = dict(warmup_steps=4, total_steps=14)
    assert [lr_multiplier(k, **f) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_multiplier(k, schedule="cosine", min_lr_ratio=0.1, **f) for k in (4, 9, 14, 20)]
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(0.55) and cos[2] == pytest.approx(0.1)
    assert cos[3] == pytest.approx(0.1)  # held at the floor past total_steps
    assert lr_multiplier(0, warmup_steps=0, total_steps=5) == 1.0


def test_video_to_model_space():
    v = torch.zeros(1, 2, 2, 2, 3, dtype=torch.uint8)  # (B, F, H, W, 3)
    v[0, 1] = 255
    x = video_to_model_space(v)
    assert x.shape == (1, 3, 2, 2, 2)
    assert (x[:, :, 0] == -1.0).all() and (x[:, :, 1] == 1.0).all()  # frame 0 black, frame 1 white
    with pytest.raises(ValueError, match="video"):
        video_to_model_space(torch.zeros(1, 2, 2, 2, 4, dtype=torch.uint8))


# ----------------------------------------------------------------------------- EMA


def test_power_ema_gamma_and_beta():
    for sigma_rel, gamma in ((0.1, 6.94), (0.05, 16.97)):
        g = ema_lib.sigma_rel_to_gamma(sigma_rel)
        assert g == pytest.approx(gamma, abs=0.01)
        # EDM2 Eq. 3 gives sigma_rel back
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    g = ema_lib.sigma_rel_to_gamma(0.1)
    assert ema_lib.power_ema_beta(0, g) == 0.0  # the first update copies
    assert ema_lib.power_ema_beta(1, g) == pytest.approx(0.5 ** (g + 1))
    assert ema_lib.power_ema_beta(999, g) == pytest.approx((1 - 1 / 1000) ** (g + 1))
    betas = [ema_lib.power_ema_beta(k, g) for k in range(1, 2000, 100)]
    assert all(a < b for a, b in zip(betas, betas[1:])) and betas[-1] < 1
    assert ema_lib.fixed_ema_beta(5, 0.99) == 0.99
    assert ema_lib.ema_beta(3, "power", sigma_rel=0.1) == pytest.approx(ema_lib.power_ema_beta(3, g))
    with pytest.raises(ValueError, match="sigma_rel"):
        ema_lib.sigma_rel_to_gamma(0.3)
    with pytest.raises(ValueError, match="kind"):
        ema_lib.ema_beta(0, "cosine")


def test_update_ema_is_a_lerp():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.25 * pa.detach() + 0.75 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ema_lib.update_ema(a, b, beta=0.25)
    for p, e in zip(a.parameters(), expected):
        assert torch.allclose(p, e)


@pytest.mark.parametrize("kind", ["power", "fixed"])
def test_module_ema_follows_its_schedule(kind):
    r = tiny_recipe(ema={"kind": kind, "sigma_rel": 0.1, "decay": 0.5})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder())
    p0 = next(m.ema.parameters()).detach().clone()
    ema_val = p0.clone()
    for k, c in enumerate((1.0, 2.0, 3.0)):
        for p in m.model.parameters():
            p.data.fill_(c)
        m.update_ema()
        beta = ema_lib.power_ema_beta(k, ema_lib.sigma_rel_to_gamma(0.1)) if kind == "power" else 0.5
        ema_val = beta * ema_val + (1 - beta) * c
    assert int(m.ema_updates) == 3
    assert torch.allclose(next(m.ema.parameters()), ema_val, atol=1e-6)
    assert all(not p.requires_grad for p in m.ema.parameters())
    # EMA weights and the update counter are in the checkpoint state
    keys = m.state_dict().keys()
    assert "ema_updates" in keys and any(k.startswith("ema.") for k in keys)


def test_extra_emas_follow_their_own_widths_and_are_exported(tmp_path):
    """ema.extra_sigma_rels: each extra copy is a power EMA of its own width over the same updates, in the
    checkpoint state, and exported as ema_sr<width>.safetensors (loadable on its own) beside ema.safetensors."""
    r = tiny_recipe(ema={"kind": "power", "sigma_rel": 0.1, "extra_sigma_rels": [0.2, 0.05]})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder(), export_dir=tmp_path)
    assert len(m.ema_extra) == 2
    vals = {w: next(m.ema.parameters()).detach().clone() for w in (0.1, 0.2, 0.05)}
    for k, c in enumerate((1.0, 2.0, 3.0, 5.0)):
        for p in m.model.parameters():
            p.data.fill_(c)
        m.update_ema()
        for w in vals:
            beta = ema_lib.power_ema_beta(k, ema_lib.sigma_rel_to_gamma(w))
            vals[w] = beta * vals[w] + (1 - beta) * c
    for net, w in ((m.ema, 0.1), (m.ema_extra[0], 0.2), (m.ema_extra[1], 0.05)):
        assert torch.allclose(next(net.parameters()), vals[w], atol=1e-6), w
    # the widths differ, so the copies do (a copy updated with the main width would fail the check above)
    assert not torch.allclose(next(m.ema_extra[0].parameters()), next(m.ema.parameters()))
    assert any(k.startswith("ema_extra.1.") for k in m.state_dict())
    m.on_fit_end()
    for name, net in (("ema_sr0.2.safetensors", m.ema_extra[0]), ("ema_sr0.05.safetensors", m.ema_extra[1])):
        loaded = WanModel.from_pretrained(tmp_path / name)
        assert torch.equal(next(loaded.parameters()), next(net.parameters()).detach())
    assert (tmp_path / "ema.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ema_sr0.2.safetensors"), "pt") as f:
        assert f.metadata()["turbo_weights"] == "ema sigma_rel 0.2"
    # none configured: no copies, nothing extra written
    plain = FlowMatchingModule(tiny_recipe(), text_encoder=FakeTextEncoder(), export_dir=tmp_path / "plain")
    assert plain.ema_extra is None
    plain.on_fit_end()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["ema.safetensors"]


# ----------------------------------------------------------------------------- training


def test_optimizer_groups_and_schedule():
    r = tiny_recipe(optim={"lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 2})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder())
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert id(m.model.blocks[0].modulation) in ids and id(m.model.blocks[0].ffn[0].bias) in ids
    assert id(m.model.blocks[0].ffn[0].weight) not in ids
    n_params = sum(1 for _ in m.model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params  # the EMA copy is not optimized
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)  # warmup step 0 of 2
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_position_tables_get_their_own_rate_without_decay():
    r = tiny_recipe(model={"overrides": {**TINY, "frame_embed_len": 4, "space_embed_len": 8}},
                    optim={"lr": 1e-3, "weight_decay": 0.05, "position_table_lr_scale": 10.0})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder())
    opt, sched = (lambda c: (c["optimizer"], c["lr_scheduler"]["scheduler"]))(m.configure_optimizers())
    decay, no_decay, tables = opt.param_groups
    assert {id(p) for p in tables["params"]} == {id(m.model.frame_embedding), id(m.model.row_embedding),
                                                 id(m.model.col_embedding)}
    assert tables["weight_decay"] == 0.0 and tables["lr"] == pytest.approx(1e-2)
    assert decay["lr"] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for _ in m.model.parameters())
    opt.step()
    sched.step()  # the schedule scales every group alike
    assert tables["lr"] / decay["lr"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="position_table_lr_scale"):
        tiny_recipe(optim={"position_table_lr_scale": 0.0})


def test_encode_batch_checks_keys():
    m = FlowMatchingModule(tiny_recipe(), text_encoder=FakeTextEncoder())
    with pytest.raises(ValueError, match="'video' or 'latent'"):
        m.encode_batch({"caption": ["a"]})
    with pytest.raises(ValueError, match="'caption' or 'context'"):
        m.encode_batch({"latent": torch.zeros(1, 48, 1, 2, 2)})
    with pytest.raises(ValueError, match="2 samples but 1"):
        m.encode_batch({"latent": torch.zeros(2, 48, 1, 2, 2), "caption": ["a"]})
    x0, ctx = m.encode_batch(toy_batch(2))
    assert x0.shape == (2, 48, 2, 16, 16) and ctx.shape == (2, 8, 384)
    assert x0.min() >= -2 and x0.max() <= 2  # the toy codec: pixels in [-1, 1] times 2


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    r = tiny_recipe(optim={"lr": 3e-3})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder())
    opt = m.configure_optimizers()["optimizer"]
    batch = toy_batch(4)
    x0, ctx = m.encode_batch(batch)

    # held-out measure: 16 copies of the batch at fixed flow times and noise
    g = torch.Generator().manual_seed(1)
    s_ev = sample_time(64, r.method.flow_matching, generator=g)
    eps_ev = torch.randn((64,) + x0.shape[1:], generator=g)

    def fixed_loss():
        with torch.no_grad():
            return rectified_flow_loss(m.model, x0.repeat(16, 1, 1, 1, 1), ctx.repeat(16, 1, 1), s_ev, eps_ev).mean().item()

    start = fixed_loss()
    for step in range(30):
        loss = m.training_step(batch, step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_ema()
    end = fixed_loss()
    print(f"fixed-batch loss {start:.4f} -> {end:.4f}")
    # measured here: 1.165 -> 1.017 (0.87x); a broken target or time path stays near the start
    assert end < 0.93 * start, (start, end)
    assert int(m.ema_updates) == 30


def test_exported_ema_loads_without_a_config(tmp_path):
    r = tiny_recipe(checkpoint={"export_dtype": "float32"})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder(), export_dir=tmp_path)
    for p in m.model.parameters():  # make the EMA differ from a fresh init
        p.data.add_(0.1 * torch.randn_like(p))
    m.update_ema()
    path = m.export_weights()
    assert path == tmp_path / "ema.safetensors" and path.is_file()
    loaded = WanModel.from_pretrained(path)  # config comes from the file's metadata
    assert loaded.config.dim == 32 and loaded.config.num_layers == 2 and loaded.config.in_channels == 48
    x, t, c = torch.randn(2, 48, 2, 4, 4), torch.tensor([100.0, 900.0]), torch.randn(2, 8, 384)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c), m.ema(x, t, c))

    r16 = tiny_recipe(checkpoint={"export_dtype": "bfloat16"})
    m16 = FlowMatchingModule(r16, text_encoder=FakeTextEncoder())
    p16 = m16.export_weights(tmp_path / "ema16.safetensors")
    loaded16 = WanModel.from_pretrained(p16)
    assert next(loaded16.parameters()).dtype == torch.bfloat16
    assert next(m16.ema.parameters()).dtype == torch.float32  # the live EMA stays fp32


def test_no_ema_exports_the_trained_weights(tmp_path):
    m = FlowMatchingModule(tiny_recipe(ema={"kind": "none"}), text_encoder=FakeTextEncoder(), export_dir=tmp_path)
    assert m.ema is None
    m.update_ema()  # a no-op
    assert m.export_weights() == tmp_path / "model.safetensors"


def test_model_checkpoint_initialises_the_weights(tmp_path):
    from turbo_infer.models.wan_keys import save_wan_checkpoint

    src = FlowMatchingModule(tiny_recipe(), text_encoder=FakeTextEncoder())
    for p in src.model.parameters():
        p.data.normal_()
    save_wan_checkpoint(src.model, tmp_path / "init.safetensors")
    r = recipe_from_dict({"model": {"overrides": dict(TINY), "checkpoint": str(tmp_path / "init.safetensors"),
                                    "activation_checkpointing": True, "activation_checkpointing_policy": "keep_attention"}})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder())
    assert m.model.checkpoint_policy == "keep_attention"
    for (n, a), b in zip(src.model.state_dict().items(), m.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert m.model.gradient_checkpointing and not m.ema.gradient_checkpointing
    assert torch.equal(next(m.ema.parameters()), next(m.model.parameters()))  # EMA starts at the init


def test_noise_repeats_train_each_video_at_several_noise_levels(monkeypatch):
    import turbo_train.methods.flow_matching as fm_mod

    seen = {}

    def capture(net, x0, context, s, eps):
        seen.update(x0=x0, context=context, s=s, eps=eps)
        return torch.zeros(x0.shape[0], requires_grad=True)

    monkeypatch.setattr(fm_mod, "rectified_flow_loss", capture)
    r = tiny_recipe(method={"flow_matching": {"noise_repeats": 3, "caption_dropout": 0.0}})
    m = FlowMatchingModule(r, text_encoder=FakeTextEncoder())
    batch = toy_batch(2)
    x0, ctx = m.encode_batch(batch)
    m.training_step(batch, 0)
    assert seen["x0"].shape[0] == 6 and seen["s"].shape == (6,)
    assert torch.equal(seen["x0"][:3], x0[:1].expand(3, *x0.shape[1:]))  # video 0 three times, then video 1
    assert torch.equal(seen["context"][3:], ctx[1:].expand(3, *ctx.shape[1:]))
    assert len(set(seen["s"][:3].tolist())) == 3  # independent flow times for the copies
    assert not torch.equal(seen["eps"][0], seen["eps"][1])
    with pytest.raises(ValueError, match="noise_repeats"):
        tiny_recipe(method={"flow_matching": {"noise_repeats": 0}})


def test_ema_update_count_host_mirror_follows_the_buffer(monkeypatch):
    """update_ema reads ema_updates once and then counts on the host (no per-step device sync); a
    state dict loaded later (a resumed run) is what the next update counts from."""
    ks = []
    monkeypatch.setattr(ema_lib, "step_ema", lambda ema, net, cfg, k, extras=None: ks.append(k))
    m = FlowMatchingModule(tiny_recipe(), text_encoder=FakeTextEncoder())
    m.update_ema()
    m.update_ema()
    assert ks == [0, 1] and int(m.ema_updates) == 2
    state = m.state_dict()
    state["ema_updates"] = torch.tensor(7)
    m.load_state_dict(state)
    m.update_ema()
    assert ks == [0, 1, 7] and int(m.ema_updates) == 8
    m.ema_updates.fill_(3)  # changed behind the mirror's back: a new fit re-reads the buffer
    m.on_fit_start()
    m.update_ema()
    assert ks[-1] == 3
