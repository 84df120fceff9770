"""SLA fine-tuning: adapt a Wan DiT to sparse-linear self-attention by matching the dense model.

SLA (Zhang et al. 2025, "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable
Sparse-Linear Attention", arXiv 2509.24006) replaces each block's self-attention by exact attention
over the top-k key blocks plus a linear branch through a per-layer `proj_l`; the swapped model must
be fine-tuned. TurboDiffusion (RCM.md §8) fine-tunes it "white-box" on the ORIGINAL model, as a
regression onto the frozen full-attention model's outputs, then merges the change into the rCM
student (`turbo_train.merge`). With the rectified-flow time of the teacher (DESIGN.md "The model"):

    x_s = (1 - s)·x0 + s·eps,   eps ~ N(0, I),   s ~ p(s)
    L_distill = E || v_SLA(x_s, 1000·s, c) - sg(v_dense(x_s, 1000·s, c)) ||^2      (mean over C,F,H,W)
    L_flow    = E || v_SLA(x_s, 1000·s, c) - (eps - x0) ||^2                       (the data loss)
    loss = L_distill | L_flow | L_distill + flow_weight·L_flow                  (method.sla.loss)

method.sla.weighting x0 multiplies each sample's terms by s²: the error of the implied clean video
x̂0 = x_s - s·v instead of the velocity's. An x0-predicting teacher (WanConfig.prediction x0) returns
v = (x_s - x̂0)/max(s, 0.05), so in velocity space an x̂0 error at s = 0.05 weighs 400 times one at
s = 1 and the few low-noise samples dominate the loss; the x0 weighting fits every time alike in the
space the model predicts.

s follows the sampler's grid (shifted uniform with Wan's shift by default), so the SLA model is fit
where the samplers evaluate it; captions drop to the unconditional states with caption_dropout so the
unconditional branch of CFG is matched too. The student starts as the teacher with SLA swapped in
(`turbo_train.sla_convert`, proj_l = 0) and trains all its parameters (or proj_l only). An optional
EMA (EDM2 power or fixed) is exported; the export keeps proj_l and the SLA options in the file's
WanConfig, so `WanModel.from_pretrained(path)` rebuilds the SLA model with no arguments.

Batches: {"video", "caption"} (toy world: toy codec + MiniLM) or {"latent", "context"} (precomputed
latents and text states, e.g. Wan latent shards; the unconditional states then come from a file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch

from turbo_infer.layers.attention import SPARSE_BACKENDS
from turbo_infer.models.wan import WanModel
from turbo_train import ema as ema_lib
from turbo_train.lightning_compat import LightningModule
from turbo_train.methods.batching import BatchEncoderMixin
from turbo_train.methods.one_network import OneNetworkMixin, export_extra_emas, export_on_checkpoint
from turbo_train.sla_convert import convert_to_sla, proj_l_norms, sla_layers

if TYPE_CHECKING:  # recipe.py imports this module for SLAFinetuneConfig: import it back lazily only
    from turbo_train.recipe import Recipe

LOSSES = ("distill", "flow", "both")
WEIGHTINGS = ("velocity", "x0")


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class SLAFinetuneConfig:
    """Settings of method `sla` (recipe section method.sla). The learning rate, warmup and weight decay
    come from the recipe's `optim` section (TurboDiffusion, Wan2.1-1.3B: lr 1e-5, batch 4 per GPU) and
    the EMA from `ema` (kind none = export the trained weights)."""

    # distill: regress the frozen dense model's velocity (white-box, TurboDiffusion); flow: the data
    # flow-matching loss only; both: distill + flow_weight·flow
    loss: Literal["distill", "flow", "both"] = "distill"
    # weight of the flow loss when loss is both, > 0. The flow loss carries the data's irreducible
    # variance (1.37 vs a distill gap of 2.7e-3 on the tiny test model), so its gradients are far
    # noisier than the distill term's: weights well below 1 are the likely useful range (untested)
    flow_weight: float = 1.0
    # space of the errors: velocity = (v_S - v_T)^2 as TurboDiffusion; x0 = s^2·(v_S - v_T)^2, the error
    # of the implied clean video x0 = x_s - s·v (the natural space of an x0-predicting model, see above)
    weighting: Literal["velocity", "x0"] = "velocity"
    # SLA of the tuned model: fraction of key blocks per query block kept exact, in (0, 1];
    # n = max(1, int(topk·ceil(L / block_k))) blocks (1.0 = dense + the linear projection's bias)
    topk: float = 0.1
    block_q: int = 128  # query tokens per block of the block map (power of two >= 16)
    block_k: int = 64  # key tokens per block of the block map (power of two >= 16)
    feature_map: Literal["softmax", "elu", "relu"] = "softmax"  # phi of the linear branch, over the head dim
    # [frames, rows, columns]: order the tokens by 3D tiles of this size, so that a block of the block map holds
    # a tile followed over frames rather than rows of one frame (turbo_infer.models.token_order); null = raster
    # order, the default: on the toy world no tile helped adherence (-0.02 to -0.12, token_order.py). Travels
    # with the exported model (attention_options.token_tile) into the merge and the bundles.
    token_tile: list[int] | None = None
    # all = every DiT parameter plus proj_l; self_attention = each block's self-attention (q, k, v, o, the q/k norms,
    # proj_l), the only part SLA changes; proj_l = the projections only. On the README job's 120-step CPU tune of
    # the student (teacher v9, 192 prompts, BENCHMARKS.md "Toy bundles"): all 0.799, self_attention 0.781, proj_l 0.750
    trainable: Literal["all", "self_attention", "proj_l"] = "all"
    # distribution of the flow time s: shifted_uniform draws u ~ U[0, 1) and applies the sampler's
    # shift s = shift·u/(1 + (shift-1)·u); logit_normal draws s = sigmoid(logit_mean + logit_std·n)
    time_distribution: Literal["logit_normal", "shifted_uniform"] = "shifted_uniform"
    shift: float = 5.0  # shift of shifted_uniform, > 0 (Wan samples with 5, the toy world with 3; 1 = uniform)
    logit_mean: float = 0.0  # location of logit_normal, logit units
    logit_std: float = 1.0  # scale of logit_normal, logit units, > 0
    caption_dropout: float = 0.1  # probability a sample is conditioned on the unconditional states, in [0, 1)
    # start of proj_l: zero (TurboDiffusion's) or lstsq, the ridge least-squares map from the linear branch to what
    # the sparse branch misses, fitted on the first training batch before the first step (turbo_train/proj_l_fit.py;
    # on the README job's CPU tune -0.020 +- 0.015 adherence, a scratch fit on other data +0.020: not established).
    # One process only.
    proj_l_init: Literal["zero", "lstsq"] = "zero"
    # lstsq: noise levels (drawn from time_distribution) at which the first batch is fitted, >= 1
    proj_l_init_times: int = 4
    # unconditional text states for caption dropout: a .safetensors (tensor "embedding" or its only
    # tensor) or .pt file holding (L, D) or (1, L, D); None = the text encoder's empty prompt (toy).
    # Latent shards (precomputed contexts) need it unless caption_dropout is 0.
    uncond_path: str | None = None
    # storage dtype of the frozen dense teacher: same = model.dtype; bfloat16 halves its memory
    teacher_dtype: Literal["same", "float32", "bfloat16"] = "same"

    def __post_init__(self):
        from turbo_infer.models.token_order import check_token_tile
        from turbo_kernels.utils import check_block
        from turbo_train.recipe import FieldError

        def need(ok, key, msg):
            if not ok:
                raise FieldError(key, msg)

        need(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        need(self.flow_weight > 0, "flow_weight", f"must be > 0, got {self.flow_weight}")
        need(self.weighting in WEIGHTINGS, "weighting", f"must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        need(0.0 < self.topk <= 1.0, "topk", f"must be in (0, 1], got {self.topk}")
        for key in ("block_q", "block_k"):
            try:
                check_block(key, getattr(self, key))
            except (TypeError, ValueError) as e:
                raise FieldError(key, str(e).removeprefix(f"{key} ")) from None
        if self.token_tile is not None:
            try:
                self.token_tile = list(check_token_tile(self.token_tile))
            except ValueError as e:
                raise FieldError("token_tile", str(e).removeprefix("token_tile ")) from None
        need(self.proj_l_init in ("zero", "lstsq"), "proj_l_init", f"must be zero or lstsq, got {self.proj_l_init!r}")
        need(self.proj_l_init_times >= 1, "proj_l_init_times", f"must be >= 1, got {self.proj_l_init_times}")
        need(self.proj_l_init == "zero" or self.loss != "flow", "proj_l_init",
             "lstsq fits against the dense model, which loss flow does not load (use loss distill or both)")
        need(self.shift > 0, "shift", f"must be > 0, got {self.shift}")
        need(self.logit_std > 0, "logit_std", f"must be > 0, got {self.logit_std}")
        need(0.0 <= self.caption_dropout < 1.0, "caption_dropout", f"must be in [0, 1), got {self.caption_dropout}")

    @property
    def uses_teacher(self) -> bool:
        return self.loss in ("distill", "both")

    def time_config(self):
        """The flow-time settings as a FlowMatchingConfig (for flow_matching.sample_time)."""
        from turbo_train.recipe import FlowMatchingConfig

        return FlowMatchingConfig(time_distribution=self.time_distribution, logit_mean=self.logit_mean,
                                  logit_std=self.logit_std, shift=self.shift, caption_dropout=self.caption_dropout)


def is_placeholder(value) -> bool:
    """A path the user has not set: null, or a shipped recipe's "<...>" placeholder (as the rCM recipes)."""
    return value is None or (isinstance(value, str) and value.strip().startswith("<"))


def check_sla_recipe(recipe: "Recipe") -> None:
    """Whole-recipe checks run before anything is built (runner.check_supported); each ValueError
    names the key to set. The local paths of the Wan recipes ship as "<...>" placeholders."""
    c = recipe.method.sla

    def unset(key, value, what):
        if is_placeholder(value):
            shown = "null" if value is None else repr(value)
            raise ValueError(f"{key}: not set ({shown}): {what}; set it in the recipe or with --set {key}=...")

    unset("model.checkpoint", recipe.model.checkpoint,
          "SLA fine-tuning starts from the dense model's weights (the original teacher, RCM.md §8)")
    if recipe.model.attention in SPARSE_BACKENDS:
        raise ValueError(f"model.attention: must be the dense backend of the original model (e.g. sdpa), got "
                         f"{recipe.model.attention!r}; the SLA settings go in method.sla (topk, block_q, block_k)")
    if recipe.data.source in ("toy_shards", "latent_shards"):
        unset("data.train_shards", recipe.data.train_shards, "the training shards (path, glob or brace pattern)")
    if c.proj_l_init == "lstsq" and (recipe.trainer.devices != 1 or recipe.trainer.num_nodes != 1):
        raise ValueError("method.sla.proj_l_init: lstsq fits proj_l in one process (each rank would fit its own batch); "
                         "set trainer.devices and trainer.num_nodes to 1, or proj_l_init: zero")
    if recipe.data.source == "latent_shards" and c.caption_dropout > 0:
        unset("method.sla.uncond_path", c.uncond_path, "latent shards carry precomputed text states, so caption "
              "dropout needs the unconditional (negative-prompt) states from a file (or set caption_dropout: 0)")


# ----------------------------------------------------------------------------- the losses


def sla_losses(student: Callable, teacher: Callable | None, x0: torch.Tensor, context: torch.Tensor,
               s: torch.Tensor, eps: torch.Tensor, loss: str = "distill",
               weighting: str = "velocity") -> dict[str, torch.Tensor]:
    """Per-sample losses (B,) of SLA fine-tuning on x_s = (1-s)·x0 + s·eps (one student forward).

    student, teacher: v(x_s, timestep=1000·s, context) -> (B, C, F, H, W); teacher runs without grad
    (None when loss is flow). x0, eps: (B, C, F, H, W); s: (B,) in (0, 1); context: (B, L, D).
    Returns {"distill": mean (v_S - v_T)^2} and/or {"flow": mean (v_S - (eps - x0))^2} (means over
    C, F, H, W), as `loss` asks; weighting x0 multiplies each by s^2 (errors of x0 = x_s - s·v)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    w = s.float().pow(2) if weighting == "x0" else torch.ones_like(s, dtype=torch.float32)  # (B,)
    s_ = s.view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    x_s = (1.0 - s_) * x0 + s_ * eps  # (B, C, F, H, W)
    t = 1000.0 * s
    v_s = student(x_s, timestep=t, context=context).float()  # SLA velocity, with grad
    out = {}
    if loss in ("distill", "both"):
        if teacher is None:
            raise ValueError(f"loss {loss!r} needs the dense teacher")
        with torch.no_grad():
            v_t = teacher(x_s, timestep=t, context=context).float()  # dense velocity (the target)
        out["distill"] = w * (v_s - v_t).pow(2).flatten(1).mean(1)
    if loss in ("flow", "both"):
        out["flow"] = w * (v_s - (eps - x0)).pow(2).flatten(1).mean(1)
    return out


def load_uncond_states(path: str | Path) -> torch.Tensor:
    """(1, L, D) float32 text states from a .safetensors ("embedding" or its only tensor) or .pt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method.sla.uncond_path: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(path))
        if "embedding" not in d and len(d) != 1:
            raise ValueError(f"method.sla.uncond_path: {path} needs a tensor 'embedding' (or exactly one), has {sorted(d)}")
        emb = d.get("embedding", next(iter(d.values())))
    else:
        emb = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(emb, torch.Tensor) or emb.dim() not in (2, 3) or (emb.dim() == 3 and emb.shape[0] != 1):
        raise ValueError(f"method.sla.uncond_path: {path} must hold a (L, D) or (1, L, D) tensor")
    return emb.reshape(1, *emb.shape[-2:]).float()


def _fit_length(emb: torch.Tensor, length: int) -> torch.Tensor:
    """(1, L', D) -> (1, length, D): cut, or zero-pad (states past a prompt's end are zero)."""
    if emb.shape[1] >= length:
        return emb[:, :length]
    return torch.cat([emb, emb.new_zeros(1, length - emb.shape[1], emb.shape[2])], dim=1)


# ----------------------------------------------------------------------------- the Lightning module


class SLAFinetuneModule(OneNetworkMixin, BatchEncoderMixin, LightningModule):
    """Fine-tunes the SLA version of a Wan DiT against the frozen dense one (see the module docstring).

    recipe: the validated recipe (method.sla, model = the dense original, optim, ema, checkpoint).
    teacher: the dense DiT; None = built from recipe.model (model.checkpoint holds its weights).
    text_encoder: encode(list[str]) -> (B, L, D) and empty_embedding() -> (1, L, D); None = the
        recipe's encoder, built on first use (only for caption batches / the empty-prompt uncond).
    codec: video -> latent codec for video batches; None = the toy codec.
    export_dir: where the tuned weights are written (with each checkpoint and at fit end); None = nowhere.
    """

    def __init__(self, recipe: "Recipe", *, teacher: WanModel | None = None, text_encoder=None, codec=None,
                 export_dir: str | Path | None = None):
        super().__init__()
        from turbo_train.methods.flow_matching import build_wan_model
        from turbo_train.recipe import Recipe

        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a turbo_train.recipe.Recipe, got {type(recipe).__name__}")
        if recipe.method.name != "sla":
            raise ValueError(f"method.name: SLAFinetuneModule needs 'sla', got {recipe.method.name!r}")
        self.save_hyperparameters({"recipe": recipe.to_dict()})
        self.recipe = recipe
        self.cfg: SLAFinetuneConfig = recipe.method.sla
        c = self.cfg

        teacher = teacher if teacher is not None else build_wan_model(recipe.model)
        if teacher.config.attention in SPARSE_BACKENDS:
            raise ValueError(f"model.attention: the teacher must use dense attention, got {teacher.config.attention!r}")
        # student: the teacher with SLA self-attention (proj_l = 0), all parameters or proj_l trainable
        self.student = convert_to_sla(teacher, topk=c.topk, block_q=c.block_q, block_k=c.block_k,
                                      feature_map=c.feature_map, token_tile=c.token_tile).train()
        self.student.requires_grad_(c.trainable == "all")
        if c.trainable == "self_attention":
            for block in self.student.blocks:
                block.self_attn.requires_grad_(True)
        for layer in sla_layers(self.student):
            layer.proj_l.requires_grad_(True)
        # frozen dense teacher: only the distillation loss needs it (validation reports against it too)
        self.teacher = None
        if c.uses_teacher:
            if c.teacher_dtype != "same":
                teacher = teacher.to(getattr(torch, c.teacher_dtype))
            self.teacher = teacher.requires_grad_(False).eval().enable_activation_checkpointing(False)
        # EMA of the student: frozen fp32 copy, a submodule so it follows the device and lands in checkpoints
        self.ema = ema_lib.frozen_copy(self.student, recipe.ema)
        self.ema_extra = ema_lib.extra_copies(self.student, recipe.ema)  # ema.extra_sigma_rels
        self.register_counters("ema_updates")  # k of the EMA schedule
        self.init_encoders(text_encoder, codec)
        self._uncond = None  # (1, L, D) unconditional states on this device
        self._proj_l_fitted = False  # proj_l_init lstsq: done before the first step of this process
        self.export_dir = Path(export_dir) if export_dir is not None else None

    # ------------------------------------------------------------------ data

    @torch.no_grad()
    def uncond_context(self, context: torch.Tensor) -> torch.Tensor:
        """(1, L, D) unconditional states matching context's L (uncond_path file, else the empty prompt)."""
        if self._uncond is None or self._uncond.device != context.device:
            with torch.autocast(context.device.type, enabled=False):
                if self.cfg.uncond_path is not None:
                    emb = load_uncond_states(self.cfg.uncond_path)
                else:
                    emb = self.text_encoder.empty_embedding()
            self._uncond = emb.to(context.device, torch.float32)
        return _fit_length(self._uncond, context.shape[1])

    # ------------------------------------------------------------------ training

    def _losses(self, net, x0, context, s, eps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, per-term means) of `net` against the teacher / the data at the given s, eps."""
        c = self.cfg
        parts = sla_losses(net, self.teacher, x0, context, s, eps, c.loss, c.weighting)
        means = {k: v.mean() for k, v in parts.items()}
        total = means.get("distill", 0.0) + (c.flow_weight if c.loss == "both" else 1.0) * means.get("flow", 0.0)
        return total, means

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from turbo_train.methods.flow_matching import drop_captions, sample_time

        c = self.cfg
        # 1. encode: pixels -> latents x0, captions -> text states, some swapped for the unconditional states
        x0, context = self.encode_batch(batch)
        B = x0.shape[0]
        if c.caption_dropout > 0:
            context, _ = drop_captions(context, self.uncond_context(context), c.caption_dropout)
        if c.proj_l_init == "lstsq" and self.global_step == 0 and not self._proj_l_fitted:  # a fresh run only
            self.fit_proj_l(x0, context)
        # 2. sample the flow time s (the sampler's grid) and the noise eps
        s = sample_time(B, c.time_config(), device=x0.device)
        eps = torch.randn_like(x0)
        # 3. SLA student vs dense teacher (and/or the data target) on x_s
        loss, means = self._losses(self.student, x0, context, s, eps)
        # 4. log
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for k, v in means.items():
            self.log(f"train/loss_{k}", v, batch_size=B)
        return loss

    @torch.no_grad()
    def fit_proj_l(self, x0: torch.Tensor, context: torch.Tensor) -> None:
        """proj_l_init lstsq: fit every proj_l of the student (and its EMA copies) on this batch, noised at
        proj_l_init_times flow times of the training distribution (turbo_train/proj_l_fit.py)."""
        from turbo_train.methods.flow_matching import sample_time
        from turbo_train.proj_l_fit import fit_proj_l

        c, B = self.cfg, x0.shape[0]
        inputs = []
        for _ in range(c.proj_l_init_times):
            s = sample_time(B, c.time_config(), device=x0.device).view(-1, 1, 1, 1, 1)
            inputs.append(((1.0 - s) * x0 + s * torch.randn_like(x0), 1000.0 * s.flatten(), context))
        explained = fit_proj_l(self.student, self.teacher, inputs)
        for copy in [self.ema, *(self.ema_extra or [])]:
            if copy is not None:
                for dst, src in zip(sla_layers(copy), sla_layers(self.student)):
                    dst.proj_l.load_state_dict(src.proj_l.state_dict())
        self._proj_l_fitted = True
        print(f"proj_l_init lstsq: fitted on {B} videos x {c.proj_l_init_times} flow times; residual explained per "
              f"layer: {', '.join(f'{e:.2f}' for e in explained)}", flush=True)
        if getattr(self, "_trainer", None) is not None:  # inside a fit (not a direct call)
            self.log("train/proj_l_init_explained", sum(explained) / len(explained), batch_size=B)

    def trained_network(self) -> torch.nn.Module:
        return self.student

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # grad norm (before Lightning's clipping) and LR
        self.log("train/proj_l_norm", proj_l_norms(self.student).mean())  # the size of the linear branch

    def configure_model(self) -> None:
        # parallelism applied from outside the networks (sequence parallel, compile, FSDP2): turbo_train/parallel.py
        from turbo_train.parallel import configure_module

        configure_module(self)

    def configure_optimizers(self):
        """AdamW over the student's trainable parameters, linear warmup then the optim schedule."""
        from turbo_train.methods.flow_matching import optimizer_config

        return optimizer_config(self.student, self.recipe.optim, self.recipe.trainer.max_steps)

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The training losses at fixed s and noise per batch index, no caption dropout (comparable across
        runs): val/loss_distill (student vs dense teacher), val/loss_flow, and the EMA's (…_ema)."""
        from turbo_train.methods.flow_matching import sample_time

        x0, context = self.encode_batch(batch)
        g = torch.Generator(device=x0.device).manual_seed(10_000 + batch_idx)
        s = sample_time(x0.shape[0], self.cfg.time_config(), device=x0.device, generator=g)
        eps = torch.randn(x0.shape, device=x0.device, generator=g, dtype=x0.dtype)
        B = x0.shape[0]
        for tag, net in (("", self.student), ("_ema", self.ema)):
            if net is None:
                continue
            loss, means = self._losses(net, x0, context, s, eps)
            self.log(f"val/loss{tag}", loss, sync_dist=True, batch_size=B)
            for k, v in means.items():
                self.log(f"val/loss_{k}{tag}", v, sync_dist=True, batch_size=B)

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the frozen teacher is rebuilt from model.checkpoint: leave it out of training checkpoints
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        export_on_checkpoint(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # put the (unchanged) teacher back so that loading stays strict for everything else
        if self.teacher is not None:
            sd = checkpoint["state_dict"]
            for k, v in self.teacher.state_dict().items():
                sd.setdefault(f"teacher.{k}", v)

    raw_weights_name = "sla.safetensors"

    def export_metadata(self) -> dict[str, str]:
        """The export holds every DiT tensor plus blocks.N.self_attn.attn.proj_l.*, and the WanConfig
        (attention sla and its options); the metadata adds the SLA settings and the source checkpoint."""
        c = self.cfg
        return {
            "turbo_method": "sla",
            "turbo_sla_loss": c.loss,
            "turbo_sla_options": json.dumps({"topk": c.topk, "block_q": c.block_q, "block_k": c.block_k,
                                             "feature_map": c.feature_map}),
            "turbo_source_checkpoint": str(self.recipe.model.checkpoint),
        }

    def on_fit_end(self) -> None:
        if self.recipe.checkpoint.export_ema:
            path = self.export_weights()
            if path is not None:
                print(f"turbo-train: wrote {path} (SLA topk {self.cfg.topk}, {self.cfg.block_q}x{self.cfg.block_k} "
                      f"blocks, {self.count('ema_updates')} EMA updates)")
            for extra in export_extra_emas(self):
                print(f"turbo-train: wrote {extra}")
