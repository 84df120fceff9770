"""Where a training step's time goes: phase timings and a torch.profiler table for one recipe.

    python tools/profile_train_step.py recipes/toy/teacher.yaml [--set key=value ...] [--steps 20]
        [--json OUT.json]

Builds the recipe's method module (with its `configure_model`: model.compile compiles the DiT blocks;
`--set model.compile=false` profiles the eager model) and data as `turbo-train` does, then runs `--steps`
training steps by hand (no Lightning loop) on one device, timing with device synchronisation:
  data     next batch from the recipe's DataLoader (workers included), moved to the device
  encode   captions -> text states, videos -> latents (the module's encode path)
  fwd_bwd  the module's training_step (loss) and backward, under the recipe's autocast
  optim    optimizer step + zero_grad
  ema      the module's EMA update (if it has one)
and then profiles 3 more steps with torch.profiler (top ops by device time, or CPU time on a CPU).
Compare `total` with the `train/step_s` of a real run (the Lightning loop, logging and callbacks add
the difference). Only methods with one optimizer (flow_matching, sla) are supported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("data", "encode", "fwd_bwd", "optim", "ema")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="training recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, as for turbo-train (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps (default 20)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--json", default=None, help="write the phase timings here")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.totals = {k: 0.0 for k in PHASES}

    @contextlib.contextmanager
    def phase(self, name: str, record: bool):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if record:
            self.totals[name] += time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    from turbo_train.recipe import load_recipe
    from turbo_train.runner import build_data, build_module, resolve_precision, uses_gpu

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.method.name not in ("flow_matching", "sla"):
        raise SystemExit(f"profile_train_step: method {recipe.method.name!r} is not supported (one optimizer only)")
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    device = torch.device("cuda" if uses_gpu(recipe) else "cpu")
    precision = resolve_precision(recipe)
    torch.manual_seed(recipe.trainer.seed)
    module = build_module(recipe).to(device)
    module.configure_model()  # one device: compile only (recipe model.compile), as the runner's strategy would
    module.train()
    opt_cfg = module.configure_optimizers()
    opt = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    data = build_data(recipe)
    if "datamodule" in data:
        data["datamodule"].setup("fit")
        loader = data["datamodule"].train_dataloader()
    else:
        loader = data["train_dataloaders"]
    batches = iter(loader)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16")
                else contextlib.nullcontext())
    module.log = lambda *a, **k: None  # no Lightning trainer here: logging is a no-op
    timer = Timer(device)

    def step(record: bool) -> None:
        with timer.phase("data", record):  # and to the device, as Lightning moves a batch
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        with timer.phase("encode", record):
            x0, context = module.encode_batch(batch)
        with timer.phase("fwd_bwd", record):
            with autocast:
                loss = module.training_step({"latent": x0, "context": context}, 0)
            loss.backward()
        with timer.phase("optim", record):
            opt.step()
            opt.zero_grad(set_to_none=True)
        with timer.phase("ema", record):
            if hasattr(module, "update_ema"):
                module.update_ema()

    for _ in range(3):
        step(False)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(True)
    total = (time.perf_counter() - t0) / args.steps
    per_step = {k: v / args.steps for k, v in timer.totals.items()}
    batch_size = recipe.data.batch_size
    out = {"recipe": args.recipe, "overrides": args.overrides, "compile": recipe.model.compile, "device": str(device),
           "precision": precision, "batch_size": batch_size, "step_s": per_step, "total_step_s": total,
           "samples_per_s": batch_size / total}
    print(json.dumps(out, indent=1))
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                step(False)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
