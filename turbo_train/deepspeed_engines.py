"""A second DeepSpeed engine for a method module with two optimizers (rCM: student and fake score).

Lightning's DeepSpeedStrategy drives one engine with one optimizer: the LightningModule and the
optimizer `configure_optimizers` returns (rCM: the student's). A method that steps another network
with its own optimizer (rCM's fake score) gets here an engine of its own, built with the same ZeRO
stage, precision and batch settings as the strategy's, whose backward/step replace that optimizer's.

    engine = build_extra_engine(net, optimizer, lr_lambda, strategy_config)
    engine.backward(loss); engine.step()          # ZeRO-partitioned grads, fp32 master weights, LR step

Its checkpoint (module, fp32 master weights, optimizer and LR-scheduler state) is written beside the
strategy's, under the same checkpoint directory with the engine's tag (`save_extra_engines` /
`load_extra_engines`, called by the runner's DeepSpeed strategy), so a resumed run continues both.

ZeRO-3 is refused: the strategy's engine partitions every parameter of the LightningModule (the
second network's included), which a second engine cannot then own.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

# keys of the strategy's DeepSpeed config that belong to its own optimizer or scheduler
_OWN_KEYS = ("optimizer", "scheduler")


def extra_engine_config(strategy_config: dict, gradient_clipping: float = 0.0) -> dict:
    """The second engine's DeepSpeed config: the strategy's (ZeRO stage, bf16/fp16, micro batch,
    accumulation) without its optimizer/scheduler sections, and this network's gradient clipping."""
    if not isinstance(strategy_config, dict):
        raise TypeError(f"strategy_config must be a dict, got {type(strategy_config).__name__}")
    stage = int(strategy_config.get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        raise ValueError("a second DeepSpeed engine needs ZeRO stage <= 2 (ZeRO-3 partitions every parameter of the "
                         "LightningModule in the strategy's engine); use deepspeed_zero2 or fsdp2")
    cfg = {k: copy.deepcopy(v) for k, v in strategy_config.items() if k not in _OWN_KEYS}
    cfg["gradient_clipping"] = float(gradient_clipping)
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    return cfg


def build_extra_engine(net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       lr_lambda: Callable[[int], float] | None, strategy_config: dict,
                       gradient_clipping: float = 0.0):
    """deepspeed.initialize over `net` and `optimizer` (its parameters must be net's), with a LambdaLR
    of `lr_lambda` (None: constant LR) stepped by engine.step(). Needs torch.distributed initialised
    (the strategy has done it). Returns the engine."""
    import deepspeed

    cfg = extra_engine_config(strategy_config, gradient_clipping)
    own = {id(p) for p in net.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in own:
                raise ValueError("build_extra_engine: the optimizer holds a parameter that is not the network's")
    sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)) if lr_lambda is not None else None
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, lr_scheduler=sched, config=cfg,
                                           dist_init_required=False)
    return engine


def save_extra_engines(engines: dict, checkpoint_dir: str | Path) -> None:
    """Every engine's checkpoint under checkpoint_dir/<name> (collective: call on every rank). The
    directory's `latest` file stays the strategy's."""
    for name, engine in engines.items():
        engine.save_checkpoint(str(checkpoint_dir), tag=name, save_latest=False)


def load_extra_engines(engines: dict, checkpoint_dir: str | Path, load_optimizer_states: bool = True) -> None:
    """Restore every engine from checkpoint_dir/<name>; a missing one is an error naming it."""
    for name, engine in engines.items():
        if not (Path(checkpoint_dir) / name).is_dir():
            raise FileNotFoundError(f"{checkpoint_dir}: no state of the {name!r} engine ({Path(checkpoint_dir) / name}); "
                                    "was this checkpoint written by a run with the same method settings?")
        path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=name, load_optimizer_states=load_optimizer_states,
                                         load_lr_scheduler_states=load_optimizer_states)
        if path is None:
            raise RuntimeError(f"{checkpoint_dir}: DeepSpeed could not load the {name!r} engine's state")
