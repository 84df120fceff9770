"""Flow-matching (rectified-flow) training of the Wan DiT: the teacher's training method.

Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; Lipman et al. 2022, "Flow Matching for
Generative Modeling"), in Wan's convention (DESIGN.md "The model"):
    x_s = (1 - s)·x0 + s·eps,  eps ~ N(0, I),  s in (0, 1)
    L = E_{x0, eps, s} || v_theta(x_s, 1000·s, c) - (eps - x0) ||^2       (mean over C, F, H, W)
with s drawn from a logit-normal (Esser et al. 2024, SD3, Sec. 3.1: s = sigmoid(m + σ·n)) or a
shifted uniform (u ~ U[0, 1), s = k·u / (1 + (k-1)·u), Wan's timestep shift), and the caption
replaced by the empty prompt with probability p so that one network is both the conditional and the
unconditional model of classifier-free guidance (Ho & Salimans 2022).

Training: AdamW with fp32 master weights, linear warmup then constant or cosine LR, bf16 autocast on
GPU (trainer.precision bf16-mixed), an EMA of the weights (EDM2 power EMA, `turbo_train.ema`) that is
exported as a standalone safetensors file loadable by `WanModel.from_pretrained`.
Batches: {"video": uint8 (B, F, H, W, 3) | float (B, 3, F, H, W) in [-1, 1], "caption": [str]}
(toy world; the toy codec maps video -> latent) or {"latent": (B, C, F, H, W), "caption" or
"context": (B, L, D)} (precomputed latents).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from turbo_infer.models.wan import POSITION_TABLES, WanModel
from turbo_infer.samplers import shift_time
from turbo_train import ema as ema_lib
from turbo_train.lightning_compat import LightningModule
from turbo_train.methods.batching import BatchEncoderMixin
from turbo_train.methods.one_network import OneNetworkMixin, export_extra_emas, export_on_checkpoint
from turbo_train.recipe import FlowMatchingConfig, ModelConfig, OptimConfig, Recipe

# ----------------------------------------------------------------------------- the loss and its pieces


def sample_time(n: int, cfg: FlowMatchingConfig, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) float32 flow times s in (0, 1) drawn from cfg.time_distribution, with a fraction
    cfg.high_noise_fraction of them (each sample independently) from the high-noise logit-normal instead,
    then mapped into [cfg.min_time, 1)."""
    if cfg.time_distribution == "logit_normal":
        z = torch.randn(n, device=device, generator=generator, dtype=torch.float32)
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    elif cfg.time_distribution == "shifted_uniform":
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float32)
        s = shift_time(u, cfg.shift)
    else:
        raise ValueError(f"time_distribution must be 'logit_normal' or 'shifted_uniform', got {cfg.time_distribution!r}")
    if cfg.high_noise_fraction > 0:
        pick = torch.rand(n, device=device, generator=generator) < cfg.high_noise_fraction
        z = torch.randn(n, device=device, generator=generator, dtype=torch.float32)
        s = torch.where(pick, torch.sigmoid(cfg.high_noise_logit_mean + cfg.high_noise_logit_std * z), s)
    if cfg.min_time > 0:  # a high-noise expert: the same draw squeezed into [min_time, 1)
        s = cfg.min_time + (1.0 - cfg.min_time) * s
    return s


def drop_captions(context: torch.Tensor, empty: torch.Tensor, p: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's text states by the empty-prompt states with probability p (for CFG).

    context (B, L, D), empty (1, L, D) -> (context', dropped (B,) bool). The draws come from `generator`'s
    device (a CPU generator can drive a GPU context)."""
    B = context.shape[0]
    draw_on = generator.device if generator is not None else context.device
    dropped = (torch.rand(B, device=draw_on, generator=generator) < p).to(context.device)  # (B,)
    out = torch.where(dropped[:, None, None], empty.to(context.dtype).expand_as(context), context)
    return out, dropped


def rectified_flow_loss(net: Callable, x0: torch.Tensor, context: torch.Tensor, s: torch.Tensor,
                        eps: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching loss (B,): mean over (C, F, H, W) of (v_theta(x_s, 1000·s) - (eps - x0))^2.

    x0, eps: (B, C, F, H, W) float32; s: (B,) in (0, 1); context (B, L, D)."""
    s_ = s.view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    x_s = (1.0 - s_) * x0 + s_ * eps  # point on the straight path from data (s=0) to noise (s=1)
    v = net(x_s, timestep=1000.0 * s, context=context).float()  # (B, C, F, H, W)
    return (v - (eps - x0)).pow(2).flatten(1).mean(1)  # (B,)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "constant",
                  min_lr_ratio: float = 0.0) -> float:
    """LR factor at optimizer step `step` (0-based): linear warmup (step+1)/warmup_steps, then 1
    (constant) or a cosine from 1 down to min_lr_ratio at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def lr_lambda(optim: OptimConfig, total_steps: int):
    """A recipe optim section's LR factor per update: `lr_multiplier` with its warmup and schedule."""
    return partial(lr_multiplier, warmup_steps=optim.warmup_steps, total_steps=total_steps,
                   schedule=optim.schedule, min_lr_ratio=optim.min_lr_ratio)


def scheduled(opt: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`opt`'s LR schedule from a recipe's optim section, counted in this optimizer's own updates."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps))


def optimizer_config(model: torch.nn.Module, optim: OptimConfig, total_steps: int) -> dict:
    """Lightning's configure_optimizers answer for one network: `adamw` stepped by `scheduled` every step."""
    opt = adamw(model, optim)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduled(opt, optim, total_steps), "interval": "step",
                                               "frequency": 1}}


# ----------------------------------------------------------------------------- builders


def build_wan_model(cfg: ModelConfig) -> WanModel:
    """The DiT of a recipe's model section: random init, or the weights of cfg.checkpoint."""
    wan_cfg = cfg.wan_config()
    if cfg.checkpoint is not None:
        model = WanModel.from_pretrained(cfg.checkpoint, config=wan_cfg, **cfg.checkpoint_overrides())
    else:
        model = WanModel(wan_cfg)
    model.to(dtype=getattr(torch, cfg.dtype))
    return model.enable_activation_checkpointing(cfg.activation_checkpointing, cfg.activation_checkpointing_policy)


def adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norm weights and modulation tables excluded). The
    absolute position tables (`WanConfig.frame_embed_len` / `space_embed_len`) get their own group: no
    decay, and `cfg.position_table_lr_scale` times the learning rate (they start at zero when added to a
    trained checkpoint, where one shared, decaying rate left them small: recipes/toy/README.md)."""
    decay, no_decay, tables = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.split(".")[-1] in POSITION_TABLES:
            tables.append(p)
        else:
            (decay if p.ndim >= 2 and not name.endswith("modulation") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tables:
        groups.append({"params": tables, "weight_decay": 0.0, "lr": cfg.lr * cfg.position_table_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


# ----------------------------------------------------------------------------- the Lightning module


class FlowMatchingModule(OneNetworkMixin, BatchEncoderMixin, LightningModule):
    """Trains a Wan DiT by rectified flow with caption dropout, AdamW, warmup and an EMA.

    recipe: the validated training recipe (model, method.flow_matching, optim, ema, checkpoint).
    model: the DiT to train; None = built from recipe.model.
    text_encoder: object with encode(list[str]) -> (B, L, D) and empty_embedding() -> (1, L, D);
        None = the recipe's encoder, built on first use on this module's device.
    codec: video -> latent codec with encode((B, 3, F, H, W)); None = the toy codec.
    export_dir: where ema.safetensors is written (with each checkpoint and at fit end); None = nowhere.
    """

    def __init__(self, recipe: Recipe, *, model: WanModel | None = None, text_encoder=None, codec=None,
                 export_dir: str | Path | None = None):
        super().__init__()
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a turbo_train.recipe.Recipe, got {type(recipe).__name__}")
        self.save_hyperparameters({"recipe": recipe.to_dict()})
        self.recipe = recipe
        self.fm: FlowMatchingConfig = recipe.method.flow_matching
        self.model = model if model is not None else build_wan_model(recipe.model)
        # EMA weights: a frozen fp32 copy, a submodule so it follows the device and lands in checkpoints
        self.ema = ema_lib.frozen_copy(self.model, recipe.ema)
        self.ema_extra = ema_lib.extra_copies(self.model, recipe.ema)  # ema.extra_sigma_rels
        self.register_counters("ema_updates")  # k of the EMA schedule
        self.init_encoders(text_encoder, codec)
        self._empty = None  # (1, L, D) empty-prompt states, on this module's device
        self.export_dir = Path(export_dir) if export_dir is not None else None

    # ------------------------------------------------------------------ encoding

    def _autocast_off(self):
        return torch.autocast(self.device.type, enabled=False)

    def empty_context(self) -> torch.Tensor:
        if self._empty is None or self._empty.device != self.device:
            with torch.no_grad(), self._autocast_off():
                self._empty = self.text_encoder.empty_embedding().to(self.device, torch.float32)
        return self._empty


    # ------------------------------------------------------------------ training

    def on_train_start(self) -> None:
        # seed_everything seeded every rank alike (same init); give each rank its own stream of noise,
        # flow times and caption dropout, and a resumed run a stream that does not replay step 0's
        torch.manual_seed(self.recipe.trainer.seed + 1_000_003 * self.global_rank + 7919 * self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # 1. encode: pixels -> latents x0, captions -> text states, some dropped to the empty prompt
        x0, context = self.encode_batch(batch)
        r = self.fm.noise_repeats
        if r > 1:  # each video at r independent noise levels (and caption-dropout draws)
            x0, context = x0.repeat_interleave(r, 0), context.repeat_interleave(r, 0)
        context, dropped = drop_captions(context, self.empty_context(), self.fm.caption_dropout)
        # 2. sample the flow time s and the noise eps
        B = x0.shape[0]
        s = sample_time(B, self.fm, device=x0.device)
        eps = torch.randn_like(x0)
        # 3. forward on x_s = (1-s)·x0 + s·eps and regress v = eps - x0
        per_sample = rectified_flow_loss(self.model, x0, context, s, eps)
        loss = per_sample.mean()
        # 4. log
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/caption_dropped", dropped.float().mean(), batch_size=B)
        return loss

    def trained_network(self) -> torch.nn.Module:
        return self.model

    def configure_model(self) -> None:
        # parallelism applied from outside the networks (sequence parallel, compile, FSDP2): turbo_train/parallel.py
        from turbo_train.parallel import configure_module

        configure_module(self)

    def configure_optimizers(self):
        return optimizer_config(self.model, self.recipe.optim, self.recipe.trainer.max_steps)

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the same loss at fixed s and noise per batch index (comparable across runs), no caption dropout
        x0, context = self.encode_batch(batch)
        g = torch.Generator(device=x0.device).manual_seed(10_000 + batch_idx)
        s = sample_time(x0.shape[0], self.fm, device=x0.device, generator=g)
        eps = torch.randn(x0.shape, device=x0.device, generator=g, dtype=x0.dtype)
        B = x0.shape[0]
        self.log("val/loss", rectified_flow_loss(self.model, x0, context, s, eps).mean(), sync_dist=True, batch_size=B)
        if self.ema is not None:
            self.log("val/loss_ema", rectified_flow_loss(self.ema, x0, context, s, eps).mean(), sync_dist=True, batch_size=B)

    # ------------------------------------------------------------------ export

    def export_metadata(self) -> dict[str, str]:
        return {"turbo_method": "flow_matching"}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        export_on_checkpoint(self)

    def on_fit_end(self) -> None:
        if self.recipe.checkpoint.export_ema:
            path = self.export_weights()
            if path is not None:
                print(f"turbo-train: wrote {path} ({self.count('ema_updates')} EMA updates)")
            for extra in export_extra_emas(self):
                print(f"turbo-train: wrote {extra}")
