"""turbo_infer.models.experts.BoundaryExperts: each batch item goes to the expert of its flow time, the
pipeline and turbo-eval take a high-noise expert, and bad inputs fail with a clear message."""
from dataclasses import replace

import pytest
import torch

from turbo_infer.models.experts import BoundaryExperts
from turbo_infer.models.wan import WAN_CONFIGS, WanModel


class _Const(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x, t, ctx):
        self.calls.append(t.clone())
        return torch.full_like(x, self.value)


def test_items_go_to_the_expert_of_their_time():
    low, high = _Const(1.0), _Const(2.0)
    net = BoundaryExperts(low, high, 0.9)
    x, ctx = torch.zeros(4, 3, 1, 2, 2), torch.zeros(4, 5, 8)
    t = torch.tensor([1000.0, 500.0, 900.0, 899.0])  # s = 1, 0.5, 0.9 (the boundary: high), 0.899
    out = net(x, t, ctx)
    assert out[:, 0, 0, 0, 0].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert high.calls[-1].tolist() == [1000.0, 900.0] and low.calls[-1].tolist() == [500.0, 899.0]
    assert net(x, torch.tensor(950.0), ctx).eq(2.0).all() and len(low.calls) == 1  # all high: one call, no split
    assert net(x, torch.full((4,), 10.0), ctx).eq(1.0).all() and len(high.calls) == 2


def test_matches_each_model_on_its_items():
    cfg = replace(WAN_CONFIGS["toy"], dim=32, ffn_dim=64, num_heads=2, num_layers=1, in_channels=4, out_channels=4,
                  text_dim=8)
    torch.manual_seed(0)
    low, high = WanModel(cfg).eval(), WanModel(cfg).eval()
    net = BoundaryExperts(low, high, 0.5)
    x, ctx = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 5, 8)
    t = torch.tensor([100.0, 700.0, 300.0])
    with torch.no_grad():
        out = net(x, t, ctx)
        torch.testing.assert_close(out[[0, 2]], low(x[[0, 2]], t[[0, 2]], ctx[[0, 2]]))
        torch.testing.assert_close(out[[1]], high(x[[1]], t[[1]], ctx[[1]]))
    assert net.config is low.config


def test_bad_boundary_and_mismatched_experts():
    cfg = replace(WAN_CONFIGS["toy"], dim=32, ffn_dim=64, num_heads=2, num_layers=1, in_channels=4, out_channels=4,
                  text_dim=8)
    low = WanModel(cfg)
    for bad in (0.0, 1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="boundary must be a flow time in"):
            BoundaryExperts(low, low, bad)
    with pytest.raises(ValueError, match="high-noise expert's text_dim"):
        BoundaryExperts(low, WanModel(replace(cfg, text_dim=16)), 0.9)


def test_pipeline_takes_a_high_noise_expert(tmp_path):
    """The shipped teacher as its own expert samples exactly what the teacher alone samples."""
    from turbo_infer.pipeline import TOY_TEACHER_PATH, TurboPipeline

    plain = TurboPipeline.toy()
    split = TurboPipeline.toy(high_noise_expert=TOY_TEACHER_PATH, expert_boundary=0.9)
    assert isinstance(split.transformer, BoundaryExperts)
    a = plain.generate(["a red circle moving left on a dark background"], steps=3, progress=False)
    b = split.generate(["a red circle moving left on a dark background"], steps=3, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="high-noise expert not found"):
        TurboPipeline.toy(high_noise_expert=tmp_path / "nope.safetensors")


def test_turbo_eval_checks_the_expert_flags(tmp_path, capsys):
    from turbo_train.eval import main

    for argv, msg in [(["--high-noise-expert", str(tmp_path / "x.safetensors")], "--high-noise-expert: file not found"),
                      (["--expert-boundary", "1.5"], "--expert-boundary must be in (0, 1)")]:
        with pytest.raises(SystemExit):
            main(argv + ["--out-dir", str(tmp_path / "o")])
        assert msg in capsys.readouterr().err
