"""Build a training run from a recipe and fit it: method module, data, strategy, loggers, callbacks,
Trainer, resume point. `turbo-train` (cli.py) is a thin shell around `fit`.

Strategies (trainer.strategy), the same recipe from one CPU to many GPUs and nodes:
  auto     one device (or Lightning's DDP when there are several)
  ddp      DistributedDataParallel: NCCL on GPUs, gloo on the CPU
  fsdp2    FSDP2 through Lightning's ModelParallelStrategy (`parallel.FSDP2Strategy`); the method
           module's `configure_model` applies Ulysses sequence parallel (trainer.sequence_parallel),
           activation checkpointing, compile and fully_shard (`turbo_train/parallel.py`); runs on the CPU
  deepspeed_zero2 / deepspeed_zero3
           Lightning's DeepSpeedStrategy at that ZeRO stage; CUDA only (refused on the CPU with a clear
           error); rCM's fake score gets a second engine (turbo_train/deepspeed_engines.py, ZeRO-2 only)
The launcher (torchrun, SLURM srun, or Lightning's own process spawning for `devices: N`) is detected
by Lightning; recipes/launch/ holds the templates.
Data: `toy_onthefly` needs only torch and numpy (`ToyBatchStream`: whole micro-batches keyed by
position, exactly resumable), `toy_shards` needs webdataset (`ToyVideoDataModule`, imported only then),
and so does `latent_shards` (`latent_shards.LatentShardDataModule`: shards written by `turbo-train
synth`); shard streams restart from their beginning on resume (not exact). Logging: a CSV log always,
wandb (offline by default) when installed. Robustness (turbo_train/callbacks.py): atomic checkpoints,
per-step seeds and saved RNG/data state (bitwise resume on the CPU), SIGTERM/SIGUSR1 -> checkpoint and
exit 143, NaN/Inf steps skipped and counted, throughput/MFU/memory logged.
"""
from __future__ import annotations

import datetime
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from turbo_train import callbacks as cb
from turbo_train.lightning_compat import has_module, pl, rank_zero_warn
from turbo_train.recipe import Recipe

SUPPORTED_STRATEGIES = ("auto", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")


# ----------------------------------------------------------------------------- checks


def check_supported(recipe: Recipe) -> None:
    """Raise ValueError (naming the recipe key) for settings this runner cannot run yet."""
    if recipe.method.name == "rcm":
        from turbo_train.methods.rcm import check_rcm_recipe

        check_rcm_recipe(recipe)  # first: unset "<...>" paths; no accumulation or clipping
    check_strategy(recipe)
    if recipe.method.name == "sla":
        from turbo_train.methods.sla import check_sla_recipe

        check_sla_recipe(recipe)  # dense teacher weights set, uncond file for latent shards
    if recipe.method.name == "calibrate":
        from turbo_train.methods.calibrate import check_calibrate_recipe

        check_calibrate_recipe(recipe)  # Wan presets: prompts file and umT5 directory
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


def check_strategy(recipe: Recipe) -> None:
    """Raise ValueError naming the recipe key for a strategy this recipe cannot run with (config first,
    then the hardware, so that a GPU recipe validated on a laptop reports its real problems)."""
    t, name = recipe.trainer, recipe.trainer.strategy
    if name not in SUPPORTED_STRATEGIES:
        raise ValueError(f"trainer.strategy: unknown strategy {name!r}; use one of {list(SUPPORTED_STRATEGIES)}")
    world = world_size(recipe)
    if t.sequence_parallel > 1:
        if name != "fsdp2":
            raise ValueError(f"trainer.sequence_parallel: {t.sequence_parallel} needs trainer.strategy fsdp2, got {name!r}")
        heads = recipe.model.wan_config().num_heads
        if heads % t.sequence_parallel:
            raise ValueError(f"trainer.sequence_parallel: {t.sequence_parallel} does not divide the model's "
                             f"{heads} attention heads")
        if world is not None and world % t.sequence_parallel:
            raise ValueError(f"trainer.sequence_parallel: {t.sequence_parallel} does not divide the "
                             f"{world} processes (trainer.devices x trainer.num_nodes)")
    if name == "fsdp2" and recipe.ema.extra_sigma_rels:
        raise ValueError("ema.extra_sigma_rels: the extra EMA copies are not sharded, so fsdp2 cannot update or "
                         "export them; leave the list empty with fsdp2 (or train with ddp)")
    precision = resolve_precision(recipe)
    if name == "fsdp2" and precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"trainer.precision: {precision!r} is not supported with fsdp2; use bf16-mixed (GPU) or 32-true")
    if name.startswith("deepspeed"):
        stage = int(name[-1])
        if recipe.method.name == "rcm" and recipe.method.rcm.uses_dmd and stage == 3:
            raise ValueError(f"trainer.strategy: {name!r}: rCM with a fake score (method.rcm.loss_mode "
                             f"{recipe.method.rcm.loss_mode!r}) steps the fake score in a second DeepSpeed engine, "
                             "which ZeRO-3 cannot give it (the strategy's engine partitions every parameter); use "
                             "deepspeed_zero2 or fsdp2")
        if recipe.ema.kind != "none" and stage == 3:
            raise ValueError("ema.kind: ZeRO-3 partitions the EMA copy, which the EMA update reads whole; use "
                             "ema.kind: none with deepspeed_zero3, or trainer.strategy fsdp2 (shards the EMA too)")
        if recipe.ema.kind != "none" and precision != "32-true":
            raise ValueError(f"ema.kind: DeepSpeed with trainer.precision {precision!r} casts the whole module, EMA "
                             "copy included, to 16 bits, where EMA updates of (1 - beta) ~ 1e-3 round away; use "
                             "ema.kind: none, trainer.precision: 32-true, or trainer.strategy fsdp2")
        if not has_module("deepspeed"):
            raise ValueError(f"trainer.strategy: {name!r} needs the deepspeed package (pip install deepspeed)")
        if not uses_gpu(recipe):
            raise ValueError(f"trainer.strategy: {name!r} runs on CUDA GPUs only (Lightning's DeepSpeedStrategy "
                             "refuses the CPU); on the CPU use ddp or fsdp2")


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


class ToyBatchStream(IterableDataset):
    """On-the-fly toy videos in whole micro-batches keyed by position: exactly resumable, and the same
    samples in the same slots whatever the process and worker counts at a fixed global batch.

    Micro-batch a (0..A-1) of optimizer step g on data-parallel rank r holds the videos
    start + g·G + (r·A + a)·B + [0, B), with G = B·dp·A the global batch (B = batch_size, A =
    accumulate, dp = data-parallel size). DataLoader worker w of W makes this rank's micro-batches
    n = w, w + W, ... (the loader returns them in order n = 0, 1, 2, ...). Video i is
    `generate_sample(sample_seed(seed, i, split))`, as in `ToyVideoStream`.

    seed, split: which videos ("train" or "eval"). start: first video index (a resumed run sets it to
    the videos already consumed). num_batches: micro-batches per rank (a finite validation set, the
    same count on every rank); None = endless. The data-parallel rank and size are set by
    `callbacks.DeterministicSteps.setup` (the strategy knows them; ranks of one sequence-parallel group
    share one); unset, they come from torch.distributed or RANK/WORLD_SIZE.
    """

    def __init__(self, seed: int, split: str, batch_size: int, accumulate: int = 1, start: int = 0,
                 num_batches: int | None = None):
        super().__init__()
        from turbo_train.toyworld.generator import SPLITS

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for name, v, low in (("seed", seed, 0), ("batch_size", batch_size, 1), ("accumulate", accumulate, 1),
                             ("start", start, 0)):
            if int(v) < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        if num_batches is not None and int(num_batches) < 1:
            raise ValueError(f"num_batches must be None or >= 1, got {num_batches}")
        self.seed, self.split, self.batch_size, self.accumulate = int(seed), split, int(batch_size), int(accumulate)
        self.start, self.num_batches = int(start), num_batches
        self.dp_rank = self.dp_size = None

    def set_data_parallel(self, rank: int, size: int) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"data-parallel rank must be in [0, {size}), got {rank}")
        self.dp_rank, self.dp_size = int(rank), int(size)

    def _data_parallel(self) -> tuple[int, int]:
        if self.dp_rank is not None:
            return self.dp_rank, self.dp_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def batch_indices(self, n: int) -> range:
        """Video indices of this rank's micro-batch n."""
        rank, dp = self._data_parallel()
        B, A = self.batch_size, self.accumulate
        g, a = divmod(n, A)
        first = self.start + g * B * dp * A + (rank * A + a) * B
        return range(first, first + B)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Micro-batches {"video": uint8 (B, F, H, W, 3), "caption": [str], "key": [str]}: what training
        reads. (No ground-truth attributes: Lightning walks every batch to move it to the device, and 256
        nested attribute dicts cost ~8 ms of host time per step; the judge reads its own stream.)"""
        import numpy as np

        from turbo_train.toyworld.generator import generate_sample, sample_seed

        info = get_worker_info()
        n, step = (info.id, info.num_workers) if info is not None else (0, 1)
        while self.num_batches is None or n < self.num_batches:
            keys, videos, captions = [], [], []
            for i in self.batch_indices(n):
                s = generate_sample(sample_seed(self.seed, i, self.split), split=self.split)
                keys.append(f"{self.split}-{i:08d}")
                videos.append(s.video)
                captions.append(s.caption)
            yield {"video": torch.from_numpy(np.stack(videos)), "caption": captions, "key": keys}
            n += step


def _whole_batches(batch):
    """DataLoader collate for a dataset that yields whole batches."""
    return batch


def build_data(recipe: Recipe) -> dict:
    """Trainer.fit data arguments: {"train_dataloaders", "val_dataloaders"} or {"datamodule"}.
    Validation data is built only when trainer.val_every_n_steps > 0."""
    d, t = recipe.data, recipe.trainer
    validate = t.val_every_n_steps > 0
    val_samples = t.val_batches * d.batch_size
    if d.source == "toy_onthefly":
        from torch.utils.data import DataLoader

        def loader(dataset):
            return DataLoader(dataset, batch_size=None, num_workers=d.num_workers, collate_fn=_whole_batches,
                              pin_memory=uses_gpu(recipe), persistent_workers=d.num_workers > 0)

        out = {"train_dataloaders": loader(ToyBatchStream(d.seed, "train", d.batch_size, t.accumulate_grad_batches))}
        if validate:
            out["val_dataloaders"] = loader(ToyBatchStream(d.seed, "eval", d.batch_size, num_batches=t.val_batches))
        return out
    if d.source == "toy_shards":
        from turbo_train.toyworld.datamodule import ToyVideoDataModule

        dm = ToyVideoDataModule(d.train_shards, d.val_shards, batch_size=d.batch_size, num_workers=d.num_workers,
                                shuffle_buffer=d.shuffle_buffer, seed=d.seed, val_samples=val_samples,
                                pin_memory=uses_gpu(recipe), labels=False)
        return {"datamodule": dm}  # with validation off, limit_val_batches=0 keeps its val loader unused
    if d.source == "latent_shards":
        from turbo_train.latent_shards import LatentShardDataModule

        return {"datamodule": LatentShardDataModule(d.train_shards, d.val_shards if validate else None,
                                                    batch_size=d.batch_size, num_workers=d.num_workers,
                                                    shuffle_buffer=d.shuffle_buffer, seed=d.seed,
                                                    pin_memory=uses_gpu(recipe))}
    raise ValueError(f"data.source: no reader for {d.source!r}")


def build_strategy(recipe: Recipe):
    """The Lightning strategy of trainer.strategy (check_strategy has validated the combination)."""
    name = recipe.trainer.strategy
    if name == "auto" and world_size(recipe) in (None, 1):
        return "auto"
    if name in ("auto", "ddp"):
        # every DiT parameter gets a gradient each step; the frozen EMA copy is skipped by DDP
        # (rCM alternates student and fake-score steps: each step leaves one network's parameters unused)
        return pl.strategies.DDPStrategy(find_unused_parameters=recipe.method.name == "rcm")
    if name == "fsdp2":
        from turbo_train.parallel import FSDP2Strategy

        # sharded checkpoints: each rank writes its shards (no gather of the whole model on rank 0)
        return FSDP2Strategy(sequence_parallel=recipe.trainer.sequence_parallel, save_distributed_checkpoint=True)
    if name.startswith("deepspeed"):
        return _deepspeed_strategy(int(name[-1]))
    raise ValueError(f"trainer.strategy: unknown strategy {name!r}")


def _deepspeed_strategy(stage: int):
    """Lightning's DeepSpeedStrategy at ZeRO `stage`, writing its checkpoint directory atomically (under
    <name>.tmp, renamed into place once every rank has written). Precision (bf16), gradient clipping and
    accumulation come from the Trainer; activation checkpointing is the model's own (recipe)."""
    from turbo_train.deepspeed_engines import load_extra_engines, save_extra_engines
    from turbo_train.parallel import _remove, _swap_in

    class AtomicDeepSpeedStrategy(pl.strategies.DeepSpeedStrategy):
        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            path = Path(self.broadcast(str(filepath)))
            tmp = path.with_name(path.name + ".tmp")
            if self.is_global_zero:
                _remove(tmp)
            self.barrier()
            super().save_checkpoint(checkpoint, tmp, storage_options)
            save_extra_engines(self._extra_engines(), tmp)  # e.g. rCM's fake score (its own engine)
            self.barrier()
            if self.is_global_zero:
                _swap_in(tmp, path)
            self.barrier()

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            state = super().load_checkpoint(checkpoint_path, weights_only)
            load_extra_engines(self._extra_engines(), checkpoint_path,
                               load_optimizer_states=self.lightning_module.trainer.state.fn == "fit")
            return state

        def _extra_engines(self) -> dict:
            hook = getattr(self.lightning_module, "extra_deepspeed_engines", None)
            return hook() if hook is not None else {}

    return AtomicDeepSpeedStrategy(stage=stage)


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


def build_callbacks(recipe: Recipe, run_dir: Path, data: dict | None = None) -> list:
    """Checkpointing, exact-resume state, preemption, non-finite steps, throughput and data-skip logging.
    `data`: build_data's result (its ToyBatchStreams are positioned on resume)."""
    ck, t = recipe.checkpoint, recipe.trainer
    train, val = ((getattr((data or {}).get(k), "dataset", None)) for k in ("train_dataloaders", "val_dataloaders"))
    train = train if isinstance(train, ToyBatchStream) else None
    others = [val] if isinstance(val, ToyBatchStream) else []
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
        cb.DeterministicSteps(t.seed, t.accumulate_grad_batches, recipe.data.batch_size, train, others),
        cb.PreemptionHandler(),
        cb.NonFiniteGuard(t.max_nonfinite_steps),
        cb.ThroughputMonitor(window=t.log_every_n_steps, precision=resolve_precision(recipe),
                             matmul_precision=t.matmul_precision),
        cb.DataSkipMonitor(),
    ]
    if recipe.logging.progress_bar:
        cbs.append(pl.callbacks.TQDMProgressBar(refresh_rate=min(t.log_every_n_steps, 10)))
    else:  # batch jobs: a plain line per logging window instead of a bar
        cbs.append(cb.ProgressLines(t.log_every_n_steps, t.max_steps,
                                    t.max_time_minutes * 60 if t.max_time_minutes else None))
    return cbs


def build_plugins(recipe: Recipe) -> list:
    """Atomic single-file checkpoints for one-device and DDP runs (FSDP2 and DeepSpeed write directories,
    swapped in by their strategies); under SLURM, Lightning's auto-requeue is off: PreemptionHandler
    owns SIGUSR1/SIGTERM and the sbatch template requeues on exit code 143."""
    plugins = []
    if recipe.trainer.strategy in ("auto", "ddp"):
        plugins.append(cb.AtomicCheckpointIO())
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        plugins.append(pl.plugins.environments.SLURMEnvironment(auto_requeue=False))
    return plugins


def build_trainer(recipe: Recipe, run_dir: Path, data: dict | None = None):
    """The Trainer; `data` (build_data's result) lets the callbacks position the data stream on resume."""
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
        callbacks=build_callbacks(recipe, run_dir, data),
        plugins=build_plugins(recipe),
        enable_progress_bar=recipe.logging.progress_bar,
        default_root_dir=str(run_dir),
    )


def resume_path(recipe: Recipe, run_dir: Path) -> str | None:
    """Checkpoint to resume from: checkpoint.resume auto -> <run_dir>/checkpoints/last.ckpt if it exists
    (a file, or a directory for FSDP2's sharded checkpoints; last.ckpt.old if a crash hit the swap of a
    directory checkpoint between its two renames)."""
    r = recipe.checkpoint.resume
    if r is None:
        return None
    if r == "auto":
        for name in ("last.ckpt", "last.ckpt.old"):
            last = run_dir / "checkpoints" / name
            if last.exists():
                return str(last)
        return None
    if not Path(r).exists():
        raise FileNotFoundError(f"checkpoint.resume: checkpoint not found: {r}")
    return r


# ----------------------------------------------------------------------------- fit


class Preempted(SystemExit):
    """Raised by `fit` after a SIGTERM/SIGUSR1 stop with its checkpoint written: exits the process with
    code 143 (callbacks.EXIT_PREEMPTED), which the SLURM template requeues."""

    def __init__(self, step: int):
        super().__init__(cb.EXIT_PREEMPTED)
        self.step = step


def fit(recipe: Recipe, run_dir: str | Path, module=None):
    """Build everything from `recipe` and train; returns (trainer, module). `module` replaces the
    recipe's module (tests pass one with a small fake text encoder). Method calibrate trains
    nothing and returns (None, path of the plan JSON).

    Raises Preempted (a SystemExit, code 143) when a signal stopped the run (checkpoint written), and
    callbacks.NonFiniteStop when trainer.max_nonfinite_steps skipped steps in a row stopped it."""
    check_supported(recipe)
    check_paths(recipe)
    run_dir = Path(run_dir)
    if recipe.method.name == "calibrate":  # trains nothing: statistics, scales and a plan JSON
        from turbo_train.methods.calibrate import run_calibration

        return None, run_calibration(recipe, run_dir)
    # the frozen EMA copy is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    torch.set_float32_matmul_precision(recipe.trainer.matmul_precision)
    pl.seed_everything(recipe.trainer.seed, workers=True)
    if module is None:
        module = build_module(recipe, export_dir=run_dir)
    data = build_data(recipe)
    trainer = build_trainer(recipe, run_dir, data)
    ckpt = resume_path(recipe, run_dir)
    if ckpt is not None and trainer.is_global_zero:
        print(f"turbo-train: resuming from {ckpt}")
    trainer.fit(module, ckpt_path=ckpt, **data)
    preemption = next(c for c in trainer.callbacks if isinstance(c, cb.PreemptionHandler))
    guard = next(c for c in trainer.callbacks if isinstance(c, cb.NonFiniteGuard))
    if preemption.preempted:
        raise Preempted(trainer.global_step)
    if guard.stopped:
        raise cb.NonFiniteStop(f"trainer.max_nonfinite_steps: {guard.consecutive} optimizer steps in a row had a "
                               f"non-finite loss or gradient ({guard.skipped} skipped in all); stopped at step "
                               f"{trainer.global_step} with a checkpoint in {run_dir / 'checkpoints'}")
    return trainer, module
