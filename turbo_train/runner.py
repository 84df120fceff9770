"""Build a training run from a recipe and fit it: method module, data, strategy, loggers, callbacks,
Trainer, resume point. `turbo-train` (cli.py) is a thin shell around `fit`.

Strategies: `auto` and `ddp` are implemented (DDP over NCCL on GPUs, gloo on the CPU). The names
`fsdp2` (ModelParallelStrategy + fully_shard), `deepspeed_zero2` and `deepspeed_zero3` are valid
recipe values that `check_supported` refuses with a ValueError until the cluster issue adds them.
Data: `toy_onthefly` needs only torch and numpy (plain DataLoaders over `ToyVideoStream`),
`toy_shards` needs webdataset (`ToyVideoDataModule`, imported only then), and so does `latent_shards`
(`latent_shards.LatentShardDataModule`: shards written by `turbo-train synth`). Logging: a CSV log
always, wandb (offline by default) when installed.
"""
from __future__ import annotations

import datetime
import time
import warnings
from pathlib import Path

import torch

from turbo_train.lightning_compat import Callback, has_module, pl, rank_zero_warn
from turbo_train.recipe import Recipe

SUPPORTED_STRATEGIES = ("auto", "ddp")


# ----------------------------------------------------------------------------- checks


def check_supported(recipe: Recipe) -> None:
    """Raise ValueError (naming the recipe key) for settings this runner cannot run yet."""
    if recipe.method.name == "rcm":
        from turbo_train.methods.rcm import check_rcm_recipe

        check_rcm_recipe(recipe)  # first: unset "<...>" paths; no accumulation or clipping
    if recipe.trainer.strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(f"trainer.strategy: {recipe.trainer.strategy!r} is not implemented yet (the cluster issue "
                         f"adds fsdp2 and DeepSpeed ZeRO); use one of {list(SUPPORTED_STRATEGIES)}")
    if recipe.method.name == "sla":
        from turbo_train.methods.sla import check_sla_recipe

        check_sla_recipe(recipe)  # dense teacher weights set, uncond file for latent shards
    if recipe.data.source in ("toy_shards", "latent_shards") and not has_module("webdataset"):
        raise ValueError(f"data.source: {recipe.data.source!r} needs the webdataset package (pip install webdataset); "
                         "toy_onthefly needs nothing extra")


def check_paths(recipe: Recipe) -> None:
    """Raise FileNotFoundError naming the recipe key for input paths that do not exist."""
    m = recipe.model
    if m.checkpoint is not None and not Path(m.checkpoint).exists():
        raise FileNotFoundError(f"model.checkpoint: not found: {m.checkpoint}")
    if m.text_encoder_path is not None and not (Path(m.text_encoder_path) / "config.json").is_file():
        raise FileNotFoundError(f"model.text_encoder_path: no text encoder (config.json) in {m.text_encoder_path}")


def uses_gpu(recipe: Recipe) -> bool:
    """Whether the run's accelerator resolves to CUDA."""
    acc = recipe.trainer.accelerator
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def resolve_precision(recipe: Recipe) -> str:
    """trainer.precision with auto resolved: bf16-mixed on a GPU, 32-true on the CPU."""
    p = recipe.trainer.precision
    if p == "auto":
        return "bf16-mixed" if uses_gpu(recipe) else "32-true"
    return p


def world_size(recipe: Recipe) -> int | None:
    """Processes in the job, or None when devices is 'auto' (known once the Trainer exists)."""
    d = recipe.trainer.devices
    return None if d == "auto" else d * recipe.trainer.num_nodes


# ----------------------------------------------------------------------------- builders


def build_module(recipe: Recipe, export_dir: str | Path | None = None):
    """The LightningModule of recipe.method.name."""
    if recipe.method.name == "flow_matching":
        from turbo_train.methods.flow_matching import FlowMatchingModule

        return FlowMatchingModule(recipe, export_dir=export_dir)
    if recipe.method.name == "rcm":
        from turbo_train.methods.rcm import RCMModule

        return RCMModule(recipe, export_dir=export_dir)
    if recipe.method.name == "sla":
        from turbo_train.methods.sla import SLAFinetuneModule

        return SLAFinetuneModule(recipe, export_dir=export_dir)
    raise ValueError(f"method.name: no module for {recipe.method.name!r}")


def build_data(recipe: Recipe) -> dict:
    """Trainer.fit data arguments: {"train_dataloaders", "val_dataloaders"} or {"datamodule"}.
    Validation data is built only when trainer.val_every_n_steps > 0."""
    d, t = recipe.data, recipe.trainer
    validate = t.val_every_n_steps > 0
    val_samples = t.val_batches * d.batch_size
    if d.source == "toy_onthefly":
        from torch.utils.data import DataLoader

        from turbo_train.toyworld.stream import ToyVideoStream, collate_toy

        def loader(dataset):
            return DataLoader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate_toy,
                              pin_memory=uses_gpu(recipe), persistent_workers=d.num_workers > 0)

        out = {"train_dataloaders": loader(ToyVideoStream(seed=d.seed, split="train"))}
        if validate:
            out["val_dataloaders"] = loader(ToyVideoStream(seed=d.seed, split="eval", num_samples=val_samples))
        return out
    if d.source == "toy_shards":
        from turbo_train.toyworld.datamodule import ToyVideoDataModule

        dm = ToyVideoDataModule(d.train_shards, d.val_shards, batch_size=d.batch_size, num_workers=d.num_workers,
                                shuffle_buffer=d.shuffle_buffer, seed=d.seed, val_samples=val_samples,
                                pin_memory=uses_gpu(recipe))
        return {"datamodule": dm}  # with validation off, limit_val_batches=0 keeps its val loader unused
    if d.source == "latent_shards":
        from turbo_train.latent_shards import LatentShardDataModule

        return {"datamodule": LatentShardDataModule(d.train_shards, d.val_shards if validate else None,
                                                    batch_size=d.batch_size, num_workers=d.num_workers,
                                                    shuffle_buffer=d.shuffle_buffer, seed=d.seed,
                                                    pin_memory=uses_gpu(recipe))}
    raise ValueError(f"data.source: no reader for {d.source!r}")


def build_strategy(recipe: Recipe):
    name = recipe.trainer.strategy
    if name == "auto":
        return "auto"
    if name == "ddp":
        # every DiT parameter gets a gradient each step; the frozen EMA copy is skipped by DDP
        # (rCM alternates student and fake-score steps: each step leaves one network's parameters unused)
        return pl.strategies.DDPStrategy(find_unused_parameters=recipe.method.name == "rcm")
    check_supported(recipe)  # raises for the names not implemented yet
    raise ValueError(f"trainer.strategy: unknown strategy {name!r}")


def build_loggers(recipe: Recipe, run_dir: Path) -> list:
    lg = recipe.logging
    loggers = [pl.loggers.CSVLogger(save_dir=str(run_dir), name="csv")]
    if lg.wandb:
        if has_module("wandb"):
            loggers.append(pl.loggers.WandbLogger(project=lg.project, name=lg.run_name or run_dir.name,
                                                  save_dir=str(run_dir), offline=lg.wandb_mode == "offline"))
        else:
            rank_zero_warn("logging.wandb is true but wandb is not installed: logging to CSV only "
                           f"({run_dir}/csv)")
    return loggers


class ThroughputMonitor(Callback):
    """Logs train/samples_per_s (all ranks together) and train/step_s, averaged over windows of
    `window` optimizer steps (the GPU is synchronized at window ends only), and on CUDA
    train/peak_mem_gib (peak allocated memory of this rank)."""

    def __init__(self, window: int = 10):
        self.window = max(1, int(window))
        self._t0 = None
        self._step0 = 0
        self._samples = 0
        self.samples_per_s = None
        self.step_s = None

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._t0, self._step0, self._samples = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x = batch.get("video", batch.get("latent")) if isinstance(batch, dict) else None
        self._samples += (x.shape[0] if x is not None else 0) * trainer.world_size
        steps = trainer.global_step - self._step0
        if steps >= self.window:
            self._sync(pl_module)
            now = time.perf_counter()
            self.samples_per_s = self._samples / (now - self._t0)
            self.step_s = (now - self._t0) / steps
            self._t0, self._step0, self._samples = now, trainer.global_step, 0
        if self.samples_per_s is not None:
            pl_module.log("train/samples_per_s", self.samples_per_s, prog_bar=True)
            pl_module.log("train/step_s", self.step_s)
        if pl_module.device.type == "cuda":
            pl_module.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(pl_module.device) / 2**30)


class StepCheckpoint(pl.callbacks.ModelCheckpoint):
    """ModelCheckpoint that also saves (a step checkpoint and last.ckpt) when training stops between
    every_n_train_steps marks, at max_steps or max_time: Lightning's own on_train_end writes last.ckpt
    only if none was ever written, so a resumed run would otherwise repeat the final steps."""

    def on_train_end(self, trainer, pl_module):
        if not self._should_skip_saving_checkpoint(trainer):  # skips if this step is already saved
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


def build_callbacks(recipe: Recipe, run_dir: Path) -> list:
    ck, t = recipe.checkpoint, recipe.trainer
    cbs = [
        StepCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=ck.every_n_steps or None,
            monitor="step", mode="max",  # "top k by step" = the k newest
            save_top_k=(-1 if ck.keep is None else ck.keep) if ck.every_n_steps else 0,
            save_last=True,
        ),
        ThroughputMonitor(window=t.log_every_n_steps),
    ]
    if recipe.logging.progress_bar:
        cbs.append(pl.callbacks.TQDMProgressBar(refresh_rate=min(t.log_every_n_steps, 10)))
    return cbs


def build_trainer(recipe: Recipe, run_dir: Path):
    t = recipe.trainer
    validate = t.val_every_n_steps > 0
    return pl.Trainer(
        accelerator="gpu" if t.accelerator == "cuda" else t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=resolve_precision(recipe),
        strategy=build_strategy(recipe),
        max_steps=t.max_steps,
        max_epochs=-1,  # runs are bounded by steps (and max_time), never by epochs
        max_time=datetime.timedelta(minutes=t.max_time_minutes) if t.max_time_minutes else None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=t.log_every_n_steps,
        # val_check_interval counts batches, not optimizer steps
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        limit_val_batches=t.val_batches if validate else 0,
        num_sanity_val_steps=0,
        logger=build_loggers(recipe, run_dir),
        callbacks=build_callbacks(recipe, run_dir),
        enable_progress_bar=recipe.logging.progress_bar,
        default_root_dir=str(run_dir),
    )


def resume_path(recipe: Recipe, run_dir: Path) -> str | None:
    """Checkpoint to resume from: checkpoint.resume auto -> <run_dir>/checkpoints/last.ckpt if it exists."""
    r = recipe.checkpoint.resume
    if r is None:
        return None
    if r == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(r).is_file():
        raise FileNotFoundError(f"checkpoint.resume: checkpoint file not found: {r}")
    return r


# ----------------------------------------------------------------------------- fit


def fit(recipe: Recipe, run_dir: str | Path, module=None):
    """Build everything from `recipe` and train; returns (trainer, module). `module` replaces the
    recipe's module (tests pass one with a small fake text encoder)."""
    check_supported(recipe)
    check_paths(recipe)
    run_dir = Path(run_dir)
    # the frozen EMA copy is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    torch.set_float32_matmul_precision(recipe.trainer.matmul_precision)
    pl.seed_everything(recipe.trainer.seed, workers=True)
    if module is None:
        module = build_module(recipe, export_dir=run_dir)
    trainer = build_trainer(recipe, run_dir)
    data = build_data(recipe)
    ckpt = resume_path(recipe, run_dir)
    if ckpt is not None and trainer.is_global_zero:
        print(f"turbo-train: resuming from {ckpt}")
    trainer.fit(module, ckpt_path=ckpt, **data)
    return trainer, module
