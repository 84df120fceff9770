"""The second DeepSpeed engine (rCM's fake score under deepspeed_zero2): config derivation (fast) and,
marked slow (DeepSpeed's first initialize on the CPU compiles for ~50 s), a real ZeRO-2 engine on the
CPU: it trains, follows the LR schedule, and a checkpoint round trip continues bitwise."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from turbo_train.deepspeed_engines import extra_engine_config


def test_config_drops_the_strategy_optimizer_and_sets_clipping():
    strategy = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True},
                "optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"}, "gradient_clipping": 1.0,
                "train_micro_batch_size_per_gpu": 4}
    cfg = extra_engine_config(strategy, gradient_clipping=0.0)
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True} and cfg["bf16"] == {"enabled": True}
    assert cfg["gradient_clipping"] == 0.0 and cfg["train_micro_batch_size_per_gpu"] == 4
    cfg["zero_optimization"]["stage"] = 1
    assert strategy["zero_optimization"]["stage"] == 2  # a copy: the strategy's config is untouched


def test_config_refuses_zero3_and_non_dicts():
    with pytest.raises(ValueError, match="ZeRO stage <= 2"):
        extra_engine_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(TypeError, match="must be a dict"):
        extra_engine_config("zero2.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world():
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _net_and_opt(lr=1e-2):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return net, torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)


def _steps(engine, n, seed):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        loss = (engine.module(x) - x.sum(1, keepdim=True)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_zero2_engine_trains_schedules_and_resumes_bitwise(gloo_world, tmp_path):
    from turbo_train.deepspeed_engines import build_extra_engine, load_extra_engines, save_extra_engines

    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 32}
    warm = lambda step: min(1.0, (step + 1) / 4)  # noqa: E731  linear warmup over 4 steps

    net, opt = _net_and_opt()
    engine = build_extra_engine(net, opt, warm, config)
    first = _steps(engine, 6, seed=1)
    assert first[-1] < first[0], first  # it trains
    assert engine.get_lr()[0] == pytest.approx(1e-2)  # warmup done after 4 steps (engine.step steps the schedule)
    save_extra_engines({"fake_score": engine}, tmp_path)
    assert (tmp_path / "fake_score").is_dir() and not (tmp_path / "latest").exists()
    reference = _steps(engine, 4, seed=2)

    net2, opt2 = _net_and_opt()
    other = build_extra_engine(net2, opt2, warm, config)
    load_extra_engines({"fake_score": other}, tmp_path)
    assert _steps(other, 4, seed=2) == reference  # weights, Adam moments and LR step all restored

    with pytest.raises(FileNotFoundError, match="'student_twin' engine"):
        load_extra_engines({"student_twin": other}, tmp_path)
    net3, _ = _net_and_opt()
    foreign = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="not the network's"):
        build_extra_engine(net3, foreign, None, config)
