"""rCM distillation as a Lightning module: a 50-step CFG teacher -> a 1-4 step student.

rCM (Zheng et al., "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time
Consistency", arXiv 2510.08431; public code NVlabs/rcm), as specified in shared/RCM.md (§n below):
the student (initialised from the teacher) is trained with the sCM consistency loss, whose tangent
comes from a forward-mode JVP through the preconditioned student (§2), plus a DMD2-style score
regulariser computed with a "fake score" network that is itself trained on student rollouts (§3).
The losses live in `rcm_losses.py`; this file holds the config, the networks, the update schedule,
the optimizers, the EMA, checkpoints and the export.

Networks: student (trainable, init teacher, JVP-capable attention), teacher (frozen, CFG w),
fake score (trainable, init teacher; only for the modes with the DMD term), EMA of the student (fp32,
EDM2 power EMA updated on student steps only; this is what gets exported).

Schedule (§3), one optimizer step per training_step (manual optimization, two AdamW optimizers; under
DeepSpeed the fake score's runs in an engine of its own, turbo_train/deepspeed_engines.py):
    iteration < tangent_warmup (modes with a consistency term):  student step, consistency loss only
    afterwards:  a student step every `student_update_freq` iterations (consistency + DMD on the same
                 batch, one optimizer step), fake-score steps in between
loss_mode: rcm (sCM + DMD), scm (sCM only: no fake score), dmd (DMD2 alone: no consistency term, no
warmup), cm_discrete (the JVP-free fallback: discrete-time CM on a shifted grid of teacher Euler
steps, + DMD after the warmup).

Batches: {"video", "caption"} (toy world: the toy codec maps pixels to latents, MiniLM encodes the
captions) or {"latent", "context"} (precomputed latents and text states, e.g. Wan latent shards).
x0 = those latents; the unconditional context is the empty prompt (toy) or a stored negative-prompt
embedding (`uncond_path`, Wan).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from turbo_infer.models.wan import WanModel
from turbo_train import ema as ema_lib
from turbo_train.lightning_compat import LightningModule
from turbo_train.methods.batching import BatchEncoderMixin
from turbo_train.methods.counters import CountersMixin
from turbo_train.methods.one_network import export_extra_emas, export_on_checkpoint
from turbo_train.methods import rcm_losses as L

if TYPE_CHECKING:  # recipe.py imports this module for RCMConfig: import it back lazily only
    from turbo_train.recipe import Recipe

LOSS_MODES = ("rcm", "scm", "dmd", "cm_discrete")


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class RCMConfig:
    """Settings of method `rcm` (recipe section method.rcm). Defaults are the spec's Wan2.1-1.3B values;
    the student's learning rate, warmup, betas, eps and weight decay come from the recipe's `optim`
    section (spec: lr 2e-6 1.3B / 1e-6 14B, warmup 100, betas (0, 0.999), eps 1e-8, wd 0.01) and its
    EMA from `ema` (spec: power, sigma_rel 0.1; recipes/toy/rcm.yaml uses 0.2, a measured deviation that
    its comment explains)."""

    # which losses train the student: rcm = sCM + DMD regulariser; scm = sCM alone (no fake score);
    # dmd = DMD2 alone (no consistency term); cm_discrete = discrete-time CM (no JVP) + DMD
    loss_mode: Literal["rcm", "scm", "dmd", "cm_discrete"] = "rcm"
    guidance: float = 5.0  # teacher CFG weight w in F_u + w·(F_c - F_u) (§2.3); 1 = conditional teacher only
    # CFG weight of the real score in L_DMD (§3: w = 5, the same teacher); None = `guidance`
    dmd_guidance: float | None = None
    # text states of the unconditional branch: a .safetensors (key "embedding" or its only tensor) or .pt
    # file holding (L, D) or (1, L, D) states, zero-padded/cut to the batch's L; None = encode
    # `negative_prompt` with model.text_encoder (toy: the empty prompt). Wan latent shards need a file.
    uncond_path: str | None = None
    negative_prompt: str = ""  # prompt of the unconditional branch when uncond_path is None ("" = empty prompt)
    P_mean: float = 0.7  # sCM time: tan t ~ LogNormal(P_mean, P_std) (§2.1); 1.3B 0.7, 14B 1.5
    P_std: float = 1.6  # sCM time log-normal scale, > 0
    # iterations (all steps, student and fake) of tangent warmup r = min(1, it/tangent_warmup) (§2.6);
    # also the iterations before the DMD term and fake-score steps start; 0 = none (14B)
    tangent_warmup: int = 1000
    scm_weight: float = 100.0  # scale of L_sCM (§2.9), > 0
    # weight of L_DMD in the student loss (§3: 1), > 0. The toy recipes deviate with 0.3: at weight 1 the
    # toy student's quality did not reproduce (4 of 5 runs at 0.84-0.92x the teacher, those inspected with
    # objects dropped and gradient backgrounds blackened: DMD's mode-seeking pull); at 0.3 five runs give
    # 0.94-0.99x (BENCHMARKS.md, rCM section)
    dmd_weight: float = 1.0
    fake_score_weight: float = 1.0  # scale of L_fake (§3), > 0
    student_update_freq: int = 5  # after the warmup: one student step per this many iterations (5: 1.3B, 10: 14B)
    fake_score_lr: float = 4e-7  # fake-score AdamW learning rate (1.3B 4e-7, 14B 1e-7); optim's other settings apply
    dmd_shift: float = 5.0  # p_D (§3): RF time u ~ U[0,1) shifted by k·u/(1+(k-1)·u); Wan's 5
    rollout_steps: int = 4  # student rollouts use n = (k mod rollout_steps) + 1 calls, k = the updates so far (1-4)
    rollout_times: Literal["random", "fixed"] = "random"  # intermediate rollout times: decreasing p_D draws, or [1.5, 1.4, 1.0]
    cm_steps: int = 48  # cm_discrete: teacher Euler steps of the grid (shifted RF grid, t_0 = π/2 ... t_N = 0)
    cm_shift: float = 5.0  # cm_discrete: timestep shift k of that grid, > 0
    # self-attention backend of the student, which must support forward-mode AD: sdpa (math backend on
    # the JVP pass; fine at toy sizes) or sdpa_jvp (Triton JVP flash attention on GPU); None = model.attention
    student_attention: str | None = None
    # storage dtype of the frozen teacher: same = model.dtype; bfloat16 halves its memory (it has no
    # optimizer, so no fp32 master copy is needed)
    teacher_dtype: Literal["same", "float32", "bfloat16"] = "same"

    def __post_init__(self):
        from turbo_train.recipe import FieldError

        def need(ok, key, msg):
            if not ok:
                raise FieldError(key, msg)

        need(self.loss_mode in LOSS_MODES, "loss_mode", f"must be one of {list(LOSS_MODES)}, got {self.loss_mode!r}")
        need(self.guidance >= 1.0, "guidance", f"must be >= 1 (1 = no CFG), got {self.guidance}")
        need(self.dmd_guidance is None or self.dmd_guidance >= 1.0, "dmd_guidance",
             f"must be >= 1 (1 = no CFG) or null, got {self.dmd_guidance}")
        need(self.P_std > 0, "P_std", f"must be > 0, got {self.P_std}")
        need(self.tangent_warmup >= 0, "tangent_warmup", f"must be >= 0, got {self.tangent_warmup}")
        for k in ("scm_weight", "dmd_weight", "fake_score_weight", "fake_score_lr", "dmd_shift", "cm_shift"):
            need(getattr(self, k) > 0, k, f"must be > 0, got {getattr(self, k)}")
        need(self.student_update_freq >= 1, "student_update_freq", f"must be >= 1, got {self.student_update_freq}")
        need(1 <= self.rollout_steps <= 4, "rollout_steps", f"must be in 1..4, got {self.rollout_steps}")
        need(self.cm_steps >= 1, "cm_steps", f"must be >= 1, got {self.cm_steps}")
        if self.student_attention is not None:
            from turbo_infer.layers.attention import available_attention

            names = set(available_attention()) | {"sdpa_jvp"}
            need(self.student_attention in names, "student_attention",
                 f"unknown backend {self.student_attention!r}; choose one of {sorted(names)}")

    @property
    def uses_consistency(self) -> bool:
        return self.loss_mode in ("rcm", "scm", "cm_discrete")

    @property
    def uses_dmd(self) -> bool:
        return self.loss_mode in ("rcm", "dmd", "cm_discrete")


def is_placeholder(value) -> bool:
    """A path the user has not set: null, or a shipped recipe's "<...>" placeholder."""
    return value is None or (isinstance(value, str) and value.strip().startswith("<"))


def check_rcm_recipe(recipe: "Recipe") -> None:
    """Checks that need the whole recipe, run before anything is built (runner.check_supported).
    Raise ValueError naming the key; the local paths of the Wan recipes ship as "<...>" placeholders."""
    r = recipe.method.rcm

    def unset(key, value, what):
        if is_placeholder(value):
            shown = "null" if value is None else repr(value)
            raise ValueError(f"{key}: not set ({shown}): {what}; set it in the recipe or with --set {key}=...")

    unset("model.checkpoint", recipe.model.checkpoint, "rCM distils a teacher: the path of its weights")
    if recipe.data.source in ("toy_shards", "latent_shards"):
        unset("data.train_shards", recipe.data.train_shards, "the training shards (path, glob or brace pattern)")
    if recipe.data.source == "latent_shards" and max(r.guidance, r.dmd_guidance or 1.0) != 1.0:
        unset("method.rcm.uncond_path", r.uncond_path, "latent shards carry precomputed text states, so the "
              "teacher's unconditional (negative-prompt) states must come from a file (or set guidance: 1)")
    if recipe.trainer.accumulate_grad_batches != 1:
        raise ValueError("trainer.accumulate_grad_batches: rCM steps its two optimizers by hand (manual "
                         "optimization), which Lightning runs without accumulation; set it to 1")
    if recipe.trainer.gradient_clip_val:
        raise ValueError("trainer.gradient_clip_val: rCM uses no gradient clipping (the norm is logged); set it to null")


# ----------------------------------------------------------------------------- helpers


def copy_network(src: WanModel, attention: str | None = None) -> WanModel:
    """A new WanModel with src's weights (cloned), optionally with another self-attention backend."""
    import importlib

    cfg = src.config if attention is None else replace(src.config, attention=attention)
    if cfg.attention == "sdpa_jvp":  # registers itself on import (kernel package; may not be a listed provider)
        importlib.import_module("turbo_infer.layers.jvp_attention")
    with torch.device("meta"):
        net = WanModel(cfg)
    net.load_state_dict({k: v.detach().clone() for k, v in src.state_dict().items()}, assign=True)
    return net.enable_activation_checkpointing(src.gradient_checkpointing, src.checkpoint_policy)


def load_uncond(path: str | Path) -> torch.Tensor:
    """(1, L, D) float32 text states from a .safetensors ("embedding" or its only tensor) or .pt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method.rcm.uncond_path: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(path))
        if "embedding" not in d and len(d) != 1:
            raise ValueError(f"method.rcm.uncond_path: {path} needs a tensor 'embedding' (or exactly one tensor), "
                             f"has {sorted(d)}")
        emb = d.get("embedding", next(iter(d.values())))
    else:
        emb = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(emb, torch.Tensor) or emb.dim() not in (2, 3) or (emb.dim() == 3 and emb.shape[0] != 1):
        raise ValueError(f"method.rcm.uncond_path: {path} must hold a (L, D) or (1, L, D) tensor, got "
                         f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
    return emb.reshape(1, *emb.shape[-2:]).float()


def _b(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1, 1), to broadcast a per-sample time against (B, C, F, H, W) states."""
    return t.reshape(-1, 1, 1, 1, 1)


def fit_length(emb: torch.Tensor, length: int) -> torch.Tensor:
    """(1, L', D) -> (1, length, D): zero-pad or cut (states past a prompt's end are zero by convention)."""
    L_ = emb.shape[1]
    if L_ >= length:
        return emb[:, :length]
    return torch.cat([emb, emb.new_zeros(1, length - L_, emb.shape[2])], dim=1)


# ----------------------------------------------------------------------------- the Lightning module


class RCMModule(CountersMixin, BatchEncoderMixin, LightningModule):
    """rCM distillation of a Wan DiT (see the module docstring).

    recipe: the validated recipe (method.rcm, model, optim, ema, checkpoint, trainer).
    teacher: the teacher DiT; None = built from recipe.model (model.checkpoint holds its weights).
    text_encoder: encode(list[str]) -> (B, L, D) and empty_embedding() -> (1, L, D); None = the
        recipe's encoder, built on first use (only for caption batches / the empty-prompt uncond).
    codec: video -> latent codec for video batches; None = the toy codec.
    export_dir: where ema.safetensors is written (with each checkpoint and at fit end); None = nowhere.
    """

    def __init__(self, recipe: "Recipe", *, teacher: WanModel | None = None, text_encoder=None, codec=None,
                 export_dir: str | Path | None = None):
        super().__init__()
        from turbo_train.methods.flow_matching import build_wan_model
        from turbo_train.recipe import Recipe

        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a turbo_train.recipe.Recipe, got {type(recipe).__name__}")
        if recipe.method.name != "rcm":
            raise ValueError(f"method.name: RCMModule needs 'rcm', got {recipe.method.name!r}")
        self.save_hyperparameters({"recipe": recipe.to_dict()})
        self.recipe = recipe
        self.cfg: RCMConfig = recipe.method.rcm
        self.automatic_optimization = False  # two optimizers, one stepped per iteration (§3)

        teacher = teacher if teacher is not None else build_wan_model(recipe.model)
        # student and fake score start as copies of the teacher (§3); the student gets the JVP backend
        self.student = copy_network(teacher, self.cfg.student_attention).requires_grad_(True).train()
        self.fake_score = copy_network(teacher).requires_grad_(True).train() if self.cfg.uses_dmd else None
        if self.cfg.teacher_dtype != "same":
            teacher = teacher.to(getattr(torch, self.cfg.teacher_dtype))
        self.teacher = teacher.requires_grad_(False).eval().enable_activation_checkpointing(False)
        # EMA of the student: frozen fp32 copy (§4), a submodule so it follows the device and is checkpointed
        self.ema = ema_lib.frozen_copy(self.student, recipe.ema)
        self.ema_extra = ema_lib.extra_copies(self.student, recipe.ema)  # ema.extra_sigma_rels
        # counters (buffers: saved in checkpoints, restored bitwise on resume; counters.py mirrors the
        # step counts on the host so that a step reads none of them from the device)
        self.register_counters("iteration", "student_updates", "fake_updates", "ema_updates")
        self.register_buffer("nan_samples", torch.zeros((), dtype=torch.long))  # summed on the device
        self.init_encoders(text_encoder, codec)
        self._uncond = None  # (1, L, D) unconditional text states on this device
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.last_logs: dict[str, torch.Tensor] = {}  # the last step's logged values (0-dim, on the device)
        # under DeepSpeed the fake score gets an engine of its own (turbo_train/deepspeed_engines.py):
        # the strategy's engine drives the student's optimizer only
        self._fake_engine = None
        self._fake_vs_teacher = None  # the latest fake_vs_teacher measurement (fake_score_losses)

    # ------------------------------------------------------------------ the networks in TrigFlow time

    @property
    def student_tf(self) -> L.TrigFlow:
        return L.TrigFlow(self.student)

    @property
    def teacher_tf(self) -> L.TrigFlow:
        return L.TrigFlow(self.teacher)

    @property
    def fake_tf(self) -> L.TrigFlow:
        return L.TrigFlow(self.fake_score)

    # ------------------------------------------------------------------ data

    @torch.no_grad()
    def uncond_context(self, context: torch.Tensor) -> torch.Tensor:
        """(1, L, D) unconditional states matching context's L (§2.3: Wan's negative prompt, toy: empty prompt)."""
        if self._uncond is None or self._uncond.device != context.device:
            with torch.autocast(context.device.type, enabled=False):
                if self.cfg.uncond_path is not None:
                    emb = load_uncond(self.cfg.uncond_path)
                elif self.cfg.negative_prompt:
                    emb = self.text_encoder.encode([self.cfg.negative_prompt])
                else:
                    emb = self.text_encoder.empty_embedding()
            self._uncond = emb.to(context.device, torch.float32)
        return fit_length(self._uncond, context.shape[1])

    # ------------------------------------------------------------------ schedule

    def is_student_step(self, iteration: int) -> bool:
        """§3: student steps only during the warmup (or without a fake score), then one every student_update_freq."""
        c = self.cfg
        if not c.uses_dmd:
            return True
        if c.uses_consistency and iteration < c.tangent_warmup:
            return True
        return iteration % c.student_update_freq == 0

    def dmd_active(self, iteration: int) -> bool:
        c = self.cfg
        return c.uses_dmd and (not c.uses_consistency or iteration >= c.tangent_warmup)

    def _rollout(self, x0: torch.Tensor, context: torch.Tensor, k: int, grad_last: bool) -> torch.Tensor:
        """Student sample G with n = (k mod rollout_steps) + 1 calls from pure noise (§3)."""
        c = self.cfg
        times = L.rollout_times(k % c.rollout_steps + 1, x0.shape[0], mode=c.rollout_times, shift=c.dmd_shift,
                                device=x0.device)
        return L.student_rollout(self.student_tf, torch.randn_like(x0), context, times, grad_last=grad_last)

    def _renoise(self, G: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_D = cos t_D·G + sin t_D·ε (no grad: only the networks' evaluations use it)."""
        return _b(torch.cos(t)) * G.detach() + _b(torch.sin(t)) * torch.randn_like(G)

    # ------------------------------------------------------------------ losses of one step

    def student_losses(self, x0, context, uncond, iteration: int) -> tuple[torch.Tensor, dict]:
        """Student loss of one batch: consistency term (sCM or discrete CM) + w_DMD·L_DMD (§2, §3)."""
        c = self.cfg
        loss = torch.zeros((), dtype=torch.float64, device=x0.device)
        logs: dict = {}
        if c.loss_mode in ("rcm", "scm"):
            l_scm, logs = self.scm_student_loss(x0, context, uncond, L.tangent_warmup_ratio(iteration, c.tangent_warmup))
            loss = loss + l_scm
        elif c.loss_mode == "cm_discrete":
            l_cm, logs = self.cm_student_loss(x0, context, uncond)
            loss = loss + l_cm
        if self.dmd_active(iteration):
            l_dmd, dmd_logs = self.dmd_student_loss(x0, context, uncond)
            loss = loss + c.dmd_weight * l_dmd
            logs.update(dmd_logs)
        return loss, logs

    def scm_student_loss(self, x0, context, uncond, r: float) -> tuple[torch.Tensor, dict]:
        """sCM (§2): t ~ p_G, x_t, teacher direction F_T (CFG), tangent J by JVP, g, normalised loss (batch mean)."""
        c = self.cfg
        B, dev = x0.shape[0], x0.device
        t = L.sample_t_scm(B, c.P_mean, c.P_std, device=dev)
        x_t = _b(torch.cos(t)) * x0.double() + _b(torch.sin(t)) * torch.randn_like(x0).double()
        with torch.no_grad():
            _, F_T = self.teacher_tf.guided(x_t, t, context, uncond, c.guidance)
        if r > 0:
            _, J = L.scm_tangent(self.student_tf, x_t, t, context, F_T)
        else:  # r = 0 drops the tangent term: skip the JVP pass
            J = torch.zeros_like(F_T)
        F_theta = self.student_tf.F(x_t, t, context)
        l_scm, n_nan, g_norm = L.scm_loss(F_theta, F_T, J, x_t, t, r, scale=c.scm_weight)
        self.nan_samples += n_nan
        # batch mean, as the public code (the spec sums over the batch: same direction, Adam is scale-free)
        return l_scm.mean(), {"loss_scm": l_scm.mean().detach(), "scm_g_norm": g_norm.mean(), "tangent_r": r}

    def cm_student_loss(self, x0, context, uncond) -> tuple[torch.Tensor, dict]:
        """Discrete-time CM (§2 end): one CFG-teacher Euler step t_i -> t_{i+1} on the shifted grid, target =
        the stop-gradient student at t_{i+1} (batch mean)."""
        c = self.cfg
        B, dev = x0.shape[0], x0.device
        grid = L.cm_discrete_grid(c.cm_steps, c.cm_shift).to(dev)
        i = torch.randint(0, c.cm_steps, (B,), device=dev)
        t, t_next = grid[i], grid[i + 1]
        x_t = _b(torch.cos(t)) * x0.double() + _b(torch.sin(t)) * torch.randn_like(x0).double()
        with torch.no_grad():
            _, F_T = self.teacher_tf.guided(x_t, t, context, uncond, c.guidance)
            x_next = L.ddim_step(x_t, F_T, t, t_next)
            f_target = self.student_tf.x0(x_next, t_next, context)
        f_cur = self.student_tf.x0(x_t, t, context)
        l_cm = L.cm_discrete_loss(f_cur, f_target, t, t_next)
        return l_cm.mean(), {"loss_cm": l_cm.mean().detach()}

    def dmd_student_loss(self, x0, context, uncond) -> tuple[torch.Tensor, dict]:
        """DMD (§3): rollout G (last call with grad), re-noise at t_D, fake vs CFG-teacher denoisings (batch mean)."""
        c = self.cfg
        G = self._rollout(x0, context, self.count("student_updates"), grad_last=True)
        t_D = L.sample_t_dmd(x0.shape[0], c.dmd_shift, device=x0.device)
        with torch.no_grad():
            x_D = self._renoise(G, t_D)
            x0_fake = self.fake_tf.x0(x_D, t_D, context)
            w = c.guidance if c.dmd_guidance is None else c.dmd_guidance
            x0_real, _ = self.teacher_tf.guided(x_D, t_D, context, uncond, w)
        l_dmd = L.dmd_loss(G, x0_fake, x0_real)
        # the loss value is Σ((x0_fake - x0_real)/wf)², a normalised surrogate; log its two parts:
        # dmd_gap = RMS(x0_fake - x0_real) (the un-normalised DMD direction) and dmd_wf = mean|G - x0_real|
        # (how far the student's sample is from the CFG teacher's denoising of it)
        gap = (x0_fake - x0_real).pow(2).mean().sqrt()
        wf = (G.detach().double() - x0_real).abs().mean()
        return l_dmd.mean(), {"loss_dmd": l_dmd.mean().detach(), "dmd_gap": gap, "dmd_wf": wf}

    def fake_score_losses(self, x0, context) -> tuple[torch.Tensor, dict]:
        """Fake-score loss (§3): denoising score matching on a no-grad student rollout, conditional only.

        Every log_every_n_steps fake updates it also logs `fake_vs_teacher`: that loss divided by the
        frozen teacher's (conditional) loss on the same samples and noise (one extra teacher forward).
        1 = the fake score knows no more about the student's samples than the teacher does (it is a copy
        of the teacher at the start); well below 1 = it tracks the student, as L_DMD assumes."""
        c = self.cfg
        k = self.count("fake_updates")
        with torch.no_grad():
            G = self._rollout(x0, context, k, grad_last=False)
        t_D = L.sample_t_dmd(x0.shape[0], c.dmd_shift, device=x0.device)
        x_D = self._renoise(G, t_D)
        x0_fake = self.fake_tf.x0(x_D, t_D, context)
        l_fake = L.fake_score_loss(G, x0_fake, t_D)
        logs = {"loss_fake": l_fake.mean().detach()}
        if k % self.recipe.trainer.log_every_n_steps == 0:
            with torch.no_grad():
                l_teacher = L.fake_score_loss(G, self.teacher_tf.x0(x_D, t_D, context), t_D)
            logs["fake_vs_teacher"] = l_fake.detach().mean() / l_teacher.mean().clamp(min=1e-12)
            self._fake_vs_teacher = logs["fake_vs_teacher"]  # logged on every step until the next one
        return c.fake_score_weight * l_fake.mean(), logs

    # ------------------------------------------------------------------ training

    def _optimizers(self):
        opts = self.optimizers()
        opts = opts if isinstance(opts, (list, tuple)) else [opts]
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, (list, tuple)) else [scheds]
        return opts, scheds

    def _optimizer_step(self, loss: torch.Tensor, net: torch.nn.Module, opt, sched) -> torch.Tensor:
        """zero_grad -> backward -> (no clipping, §4: log the norm) -> step -> LR schedule."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss.float())
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is None:
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        opt.step()
        sched.step()
        if engine is not None:  # DeepSpeed: ZeRO keeps the gradients in its partitions, not in p.grad
            ds_norm = engine.get_global_grad_norm()
            norm = torch.tensor(float(ds_norm) if ds_norm is not None else 0.0)
        return norm

    def _fake_engine_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """backward -> step (ZeRO-reduced grads, no clipping, LR schedule) through the fake score's engine;
        returns (grad norm, LR used)."""
        engine = self._fake_engine
        lr = torch.tensor(float(engine.get_lr()[0]))
        engine.backward(loss.float())
        # count the step in trainer.global_step as Lightning counts a step of its own optimizers, so that
        # max_steps, checkpoint intervals and logs count iterations under every strategy alike
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        engine.step()
        progress.increment_completed()
        norm = engine.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else 0.0), lr

    def uses_deepspeed(self) -> bool:
        """Whether the attached trainer runs Lightning's DeepSpeedStrategy."""
        if self._trainer is None:
            return False
        from turbo_train.lightning_compat import pl

        return isinstance(self.trainer.strategy, pl.strategies.DeepSpeedStrategy)

    def extra_deepspeed_engines(self) -> dict:
        """{tag: engine} of the engines this module steps itself (checkpointed beside the strategy's)."""
        return {"fake_score": self._fake_engine} if self._fake_engine is not None else {}

    def on_fit_start(self) -> None:
        super().on_fit_start()  # CountersMixin: re-read the counters (a resumed run restored them)
        # DeepSpeed: the strategy's engine holds the student's optimizer (configure_optimizers returned
        # only that one); build the fake score's engine now, before a resumed run restores both
        if self.fake_score is not None and self.uses_deepspeed() and self._fake_engine is None:
            from turbo_train.deepspeed_engines import build_extra_engine
            from turbo_train.methods.flow_matching import lr_lambda

            self._fake_engine = build_extra_engine(self.fake_score, self._fake_score_optimizer(),
                                                   lr_lambda(self.recipe.optim, self.recipe.trainer.max_steps),
                                                   getattr(self.trainer.strategy, "config", {}))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # 1. encode: pixels -> latents x0, captions -> text states; the unconditional states for CFG
        x0, context = self.encode_batch(batch)
        uncond = self.uncond_context(context)
        it = self.count("iteration")
        (opt_s, *opt_f), (sched_s, *sched_f) = self._optimizers()
        if self.is_student_step(it):
            # 2a. student step: consistency + DMD loss, one optimizer step, EMA update (§3, §4)
            loss, logs = self.student_losses(x0, context, uncond, it)
            logs["grad_norm_student"] = self._optimizer_step(loss, self.student, opt_s, sched_s)
            self.bump("student_updates")
            self.update_ema()
            logs["lr_student"] = torch.tensor(opt_s.param_groups[0]["lr"])
        else:
            # 2b. fake-score step on a student rollout
            loss, logs = self.fake_score_losses(x0, context)
            if self._fake_engine is not None:  # DeepSpeed: the fake score's own engine
                logs["grad_norm_fake"], logs["lr_fake"] = self._fake_engine_step(loss)
            else:
                logs["grad_norm_fake"] = self._optimizer_step(loss, self.fake_score, opt_f[0], sched_f[0])
                logs["lr_fake"] = torch.tensor(opt_f[0].param_groups[0]["lr"])
            self.bump("fake_updates")
        self.bump("iteration")
        # 3. log (a run without a progress bar prints a line every log_every_n_steps: callbacks.ProgressLines)
        B = x0.shape[0]
        logs.update(student_updates=self.student_updates.float(), fake_updates=self.fake_updates.float(),
                    nan_samples=self.nan_samples.float())
        if self._fake_vs_teacher is not None:  # the latest measurement, so that the
            logs.setdefault("fake_vs_teacher", self._fake_vs_teacher)  # logger's steps always carry one
        # 0-dim tensors, left on the device: Lightning and ProgressLines read logged values on their log
        # steps only (a float() per value per step would sync the GPU)
        self.last_logs = {k: torch.as_tensor(v).detach().float() for k, v in logs.items()}
        for k, v in self.last_logs.items():
            self.log(f"train/{k}", v, batch_size=B, prog_bar=k in ("loss_scm", "loss_cm", "loss_dmd", "loss_fake"))
        return loss.detach()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- beta(k)·ema + (1 - beta(k))·student, k = EMA updates so far (student steps only, §4)."""
        if self.ema is None:
            return
        ema_lib.step_ema(self.ema, self.student, self.recipe.ema, self.count("ema_updates"), self.ema_extra)
        self.bump("ema_updates")

    def configure_model(self) -> None:
        # parallelism applied from outside the networks (sequence parallel, compile, FSDP2): turbo_train/parallel.py
        from turbo_train.parallel import configure_module

        configure_module(self)

    def _fake_score_optimizer(self) -> torch.optim.AdamW:
        from turbo_train.methods.flow_matching import adamw

        return adamw(self.fake_score, replace(self.recipe.optim, lr=self.cfg.fake_score_lr))

    def configure_optimizers(self):
        """AdamW for the student (optim section) and the fake score (lr = fake_score_lr), each with
        linear warmup then the optim schedule, counted in its own updates (§4)."""
        from turbo_train.methods.flow_matching import adamw, scheduled

        opts = [adamw(self.student, self.recipe.optim)]
        if self.fake_score is not None and not self.uses_deepspeed():  # DeepSpeed: on_fit_start builds its engine
            opts.append(self._fake_score_optimizer())
        scheds = [scheduled(opt, self.recipe.optim, self.recipe.trainer.max_steps) for opt in opts]
        return opts, scheds

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """val/x0_gap: mean squared gap between the (EMA) student's and the CFG teacher's x0 predictions
        at fixed times t in {0.5, 1.0, 1.5} and fixed noise per batch index (comparable across runs)."""
        x0, context = self.encode_batch(batch)
        uncond = self.uncond_context(context)
        g = torch.Generator(device=x0.device).manual_seed(10_000 + batch_idx)
        eps = torch.randn(x0.shape, device=x0.device, generator=g, dtype=x0.dtype)
        net = L.TrigFlow(self.ema if self.ema is not None else self.student)
        gaps = []
        for tv in (0.5, 1.0, 1.5):
            t = torch.full((x0.shape[0],), tv, dtype=torch.float64, device=x0.device)
            x_t = _b(torch.cos(t)) * x0 + _b(torch.sin(t)) * eps
            x0_s = net.x0(x_t, t, context)
            x0_t, _ = self.teacher_tf.guided(x_t, t, context, uncond, self.cfg.guidance)
            gaps.append((x0_s - x0_t).pow(2).mean())
        self.log("val/x0_gap", torch.stack(gaps).mean().float(), sync_dist=True, batch_size=x0.shape[0])

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the frozen teacher is rebuilt from model.checkpoint: leave it out of training checkpoints
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        export_on_checkpoint(self, self.count("iteration"))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # put the (unchanged) teacher back so that loading stays strict for everything else
        sd = checkpoint["state_dict"]
        for k, v in self.teacher.state_dict().items():
            sd.setdefault(f"teacher.{k}", v)

    def export_weights(self, path: str | Path | None = None, net: torch.nn.Module | None = None,
                       weights: str | None = None) -> Path | None:
        """Write the EMA student (the student if ema.kind is none; `net` = another copy, e.g. an extra EMA,
        labelled `weights` in the metadata) as a standalone safetensors with its WanConfig in the metadata
        (WanModel.from_pretrained loads it with no config). Default path: <export_dir>/ema.safetensors
        (student.safetensors without EMA); None where nothing is written."""
        if path is None:
            if self.export_dir is None:
                return None
            path = self.export_dir / ("ema.safetensors" if self.ema is not None else "student.safetensors")
        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        from turbo_infer.models.wan_keys import save_wan_checkpoint

        if net is None:
            net = self.ema if self.ema is not None else self.student
            weights = "ema" if self.ema is not None else "raw"
        dtype = getattr(torch, self.recipe.checkpoint.export_dtype)
        # export with the model's configured attention (the student's JVP backend is a training detail)
        out = copy_network(net, self.teacher.config.attention).to(dtype)
        meta = {
            "turbo_method": "rcm",
            "turbo_rcm_loss_mode": self.cfg.loss_mode,
            "turbo_weights": weights or "ema",
            "turbo_student_updates": str(self.count("student_updates")),
            "turbo_recipe": json.dumps(self.recipe.to_dict()),
        }
        save_wan_checkpoint(out, path, extra_metadata=meta)
        return Path(path)

    def on_fit_end(self) -> None:
        if self.recipe.checkpoint.export_ema:
            path = self.export_weights()
            if path is not None:
                print(f"turbo-train: wrote {path} ({self.count('student_updates')} student updates, "
                      f"{self.count('fake_updates')} fake-score updates, {int(self.nan_samples)} NaN samples zeroed)")
            for extra in export_extra_emas(self):
                print(f"turbo-train: wrote {extra}")
