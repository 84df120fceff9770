"""The toy-world judge: a small 3D-conv video classifier trained on generator ground truth. It
reads a toy video and names its background and, per object slot, shape, color and motion (plus
whether a second object is there); its penultimate features feed the Fréchet distance and the
diversity score (metrics.py).

Network (JudgeConfig defaults, 0.37 M parameters), input (B, 3, F=8, H=64, W=64) in [-1, 1]:
    4 x [Conv3d 3x3x3 -> GroupNorm(8) -> SiLU], strides (1,2,2) (1,2,2) (2,2,2) (1,2,2)
        -> (B, 128, 4, 4, 4); receptive field 31 px x 11 frames: a whole object and its path
    [mean ; max] over (F, H, W) -> Linear -> SiLU        = features (B, 256)
    one Linear head per attribute slot (attributes.HEADS)
Objects are told apart by the canonical order (obj1 = the lower COLORS index), so the heads must
bind shape and motion to color; global pooling of conjunctive conv features is enough for that.

Training (`train_judge`, one flat loop): videos generated on the fly (stream.ToyVideoStream, a
fresh video every step, never repeated), summed cross-entropy over heads (obj2_* ignored for
one-object videos), AdamW with linear warm-up then cosine decay, pixel noise augmentation so the
judge tolerates imperfect generations. Evaluation: per-attribute accuracy on `eval_samples`
held-out videos (the "eval" split: seeds disjoint from training). Output: judge.safetensors and
judge.json (the card: architecture, vocabularies, recipe, training time, metrics).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbo_infer.files import publish_file

from .attributes import BACKGROUNDS, COLORS, HEADS, IGNORE, MOTIONS, SHAPES, labels_to_attributes
from .generator import HEIGHT, NUM_FRAMES, WIDTH, video_to_float

CARD_FORMAT = "turbo-toy-judge/1"
VOCAB = {"shapes": list(SHAPES), "colors": list(COLORS), "motions": list(MOTIONS), "backgrounds": list(BACKGROUNDS)}


# ----------------------------------------------------------------------------- model


@dataclass(kw_only=True)
class JudgeConfig:
    """Judge architecture."""

    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of the 4 conv stages
    feature_dim: int = 256  # penultimate width (the Fréchet / diversity feature)
    groups: int = 8  # GroupNorm groups (each width must divide by it)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"JudgeConfig.widths must be 4 positive ints, got {self.widths}")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"JudgeConfig.widths {self.widths} must all be divisible by groups={self.groups}")
        if self.feature_dim < 1:
            raise ValueError(f"JudgeConfig.feature_dim must be >= 1, got {self.feature_dim}")


class Judge(nn.Module):
    """Video classifier with one head per attribute slot (attributes.HEADS)."""

    STRIDES = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2))

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config or JudgeConfig()
        layers, c_in = [], 3
        for c, stride in zip(self.config.widths, self.STRIDES):
            layers += [nn.Conv3d(c_in, c, 3, stride=stride, padding=1), nn.GroupNorm(self.config.groups, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * c_in, self.config.feature_dim)
        self.heads = nn.ModuleDict({h: nn.Linear(self.config.feature_dim, n) for h, n in HEADS.items()})

    # -- inputs

    @staticmethod
    def prepare(videos) -> torch.Tensor:
        """uint8 (B, F, H, W, 3) numpy/torch, or float (B, 3, F, H, W) in [-1, 1] (clamped)
        -> float32 (B, 3, F, H, W). Raises ValueError on other shapes."""
        x = torch.as_tensor(videos)
        if x.dtype == torch.uint8:
            if x.dim() != 5 or tuple(x.shape[1:]) != (NUM_FRAMES, HEIGHT, WIDTH, 3):
                raise ValueError(f"uint8 videos must be (B, {NUM_FRAMES}, {HEIGHT}, {WIDTH}, 3), got {tuple(x.shape)}")
            return video_to_float(x)
        if not x.is_floating_point():
            raise TypeError(f"videos must be uint8 (B, F, H, W, 3) or float (B, 3, F, H, W), got {x.dtype}")
        if x.dim() != 5 or tuple(x.shape[1:]) != (3, NUM_FRAMES, HEIGHT, WIDTH):
            raise ValueError(f"float videos must be (B, 3, {NUM_FRAMES}, {HEIGHT}, {WIDTH}), got {tuple(x.shape)}")
        return x.float().clamp(-1, 1)

    # -- network

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, 3, F, H, W) in [-1, 1] -> features (B, feature_dim)."""
        h = self.body(x)  # (B, C, 4, 4, 4)
        h = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)  # (B, 2C)
        return F.silu(self.fc(h))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float (B, 3, F, H, W) in [-1, 1] -> {head: logits (B, classes)}."""
        f = self.forward_features(x)
        return {h: head(f) for h, head in self.heads.items()}

    # -- scoring API (eval mode, no grad, chunks of `batch_size`, inputs moved to the judge's device)

    @torch.no_grad()
    def _map(self, videos, fn, batch_size: int):
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            x = self.prepare(videos)
            return [fn(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)

    def predict(self, videos, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """{head: int64 (B,) class index} (CPU); obj2_* are IGNORE (-1) where obj2_present is 0."""
        parts = self._map(videos, lambda x: {h: v.argmax(-1).cpu() for h, v in self(x).items()}, batch_size)
        pred = {h: torch.cat([p[h] for p in parts]) for h in HEADS}
        absent = pred["obj2_present"] == 0
        for h in ("obj2_shape", "obj2_color", "obj2_motion"):
            pred[h] = pred[h].masked_fill(absent, IGNORE)
        return pred

    def predict_attributes(self, videos, batch_size: int = 256) -> list[dict[str, Any]]:
        """Predicted scenes as attribute dicts (see attributes.labels_to_attributes)."""
        pred = self.predict(videos, batch_size)
        return [labels_to_attributes({h: int(pred[h][i]) for h in HEADS}) for i in range(len(pred["background"]))]

    def features(self, videos, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (B, feature_dim), float32 on CPU."""
        return torch.cat(self._map(videos, lambda x: self.forward_features(x).float().cpu(), batch_size))


# ----------------------------------------------------------------------------- save / load


def save_judge(judge: Judge, out_dir: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
    """Write `judge.safetensors` and the card `judge.json` into out_dir; returns the weights path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(out / "judge.safetensors.tmp"), metadata={"format": CARD_FORMAT})
    publish_file(out / "judge.safetensors.tmp", out / "judge.safetensors")
    full = {"format": CARD_FORMAT, "model": asdict(judge.config), "vocab": VOCAB, "heads": HEADS, **(card or {})}
    (out / "judge.json").write_text(json.dumps(full, indent=1))
    return out / "judge.safetensors"


def default_weights() -> Path:
    """The judge shipped in the package: turbo_train/toyworld/weights/judge.safetensors."""
    from importlib.resources import files

    return Path(str(files("turbo_train.toyworld") / "weights" / "judge.safetensors"))


def load_judge(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Judge:
    """Load a judge from a .safetensors file (its judge.json beside it) or a directory holding
    both; None loads the shipped one. Refuses a card whose vocabularies differ from this code's."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else default_weights()
    if p.is_dir():
        p = p / "judge.safetensors"
    if not p.exists():
        hint = " (no judge is shipped yet: train one with `python -m turbo_train.toyworld.judge`)" if path is None else ""
        raise FileNotFoundError(f"judge weights not found: {p}{hint}")
    card_path = p.with_name("judge.json")
    if not card_path.exists():
        raise FileNotFoundError(f"judge card not found beside the weights: {card_path}")
    card = json.loads(card_path.read_text())
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{card_path}: format must be {CARD_FORMAT!r}, got {card.get('format')!r}")
    if card.get("vocab") != VOCAB:
        raise ValueError(f"{card_path}: vocab {card.get('vocab')} differs from this code's {VOCAB}")
    judge = Judge(JudgeConfig(**card["model"]))
    judge.load_state_dict(load_file(str(p)))
    judge.card = card
    return judge.to(device).eval()


# ----------------------------------------------------------------------------- training


@dataclass(kw_only=True)
class JudgeTrainConfig:
    """Judge training recipe (recipes/toy/judge.yaml sets these keys)."""

    steps: int = 4000  # optimizer steps; one fresh batch of generated videos each
    max_minutes: float | None = None  # wall-clock cap on the training loop (the LR decay follows it); None = none
    batch_size: int = 256  # videos per step
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_steps: int = 200  # linear warm-up from 0 to lr, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.02  # final learning rate as a fraction of lr
    noise_std: float = 0.08  # pixel noise augmentation: N(0, sigma^2) with sigma ~ U[0, noise_std], in [-1, 1] units; 0 = off
    seed: int = 0  # training videos are the "train" split of this seed; also seeds the weights
    eval_seed: int = 1  # held-out videos are the "eval" split of this seed
    eval_samples: int = 2048  # held-out videos scored at the end
    num_workers: int | None = None  # DataLoader processes generating videos; None = min(12, cores - 2) (0 on 1-2 cores)
    device: str = "cuda"  # "cuda", "cpu", "cuda:1", ...
    log_every: int = 100  # steps between progress lines on stdout
    model: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = JudgeConfig(**self.model)
        for name in ("steps", "batch_size", "eval_samples", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"JudgeTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "seed", "eval_seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"JudgeTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"JudgeTrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.noise_std < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("JudgeTrainConfig.weight_decay and noise_std must be >= 0, min_lr_ratio in [0, 1]")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"JudgeTrainConfig.max_minutes must be None or > 0, got {self.max_minutes}")
        if self.num_workers is not None and int(self.num_workers) < 0:
            raise ValueError(f"JudgeTrainConfig.num_workers must be None or >= 0, got {self.num_workers}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "JudgeTrainConfig":
        """Read a recipe; unknown keys raise ValueError naming them; `overrides` win over the file."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a judge recipe must be a mapping, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown judge recipe keys {unknown} (known: {sorted(known)})")
        return cls(**data)


def lr_at(step: int, cfg: JudgeTrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up to cfg.lr over min(warmup_steps, steps / 5) steps, then cosine decay to
    cfg.lr * cfg.min_lr_ratio. Progress is the larger of step / steps and elapsed / max_minutes,
    so a run cut by the time cap still ends with the decay done."""
    warmup = min(cfg.warmup_steps, cfg.steps // 5)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    if cfg.max_minutes is not None:
        t = max(t, elapsed_s / (60.0 * cfg.max_minutes))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def judge_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy (IGNORE labels skipped)."""
    total = 0.0
    for h in HEADS:
        if (labels[h] != IGNORE).any():
            total = total + F.cross_entropy(logits[h].float(), labels[h], ignore_index=IGNORE)
    return total


def _loader(dataset, batch_size: int, num_workers: int, device: torch.device):
    from torch.utils.data import DataLoader

    from .stream import collate_toy

    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_toy,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if num_workers > 0 else None)


def evaluate_judge(judge: Judge, num_samples: int, seed: int, batch_size: int = 256, num_workers: int = 0) -> dict[str, Any]:
    """Per-attribute accuracy of `judge` on the first `num_samples` held-out ("eval" split) videos of `seed`."""
    from .metrics import per_attribute_accuracy
    from .stream import ToyVideoStream

    device = next(judge.parameters()).device
    preds, truths = [], []
    for batch in _loader(ToyVideoStream(seed=seed, split="eval", num_samples=num_samples), batch_size, num_workers, device):
        preds += judge.predict_attributes(batch["video"], batch_size)
        truths += batch["attributes"]
    acc = per_attribute_accuracy(preds, truths)
    return {"per_attribute_accuracy": acc, "min_attr_acc": min(acc.values()), "eval_samples": len(truths)}


def train_judge(
    out_dir: str | os.PathLike,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    config: JudgeTrainConfig | None = None,
    **overrides,
) -> dict[str, Any]:
    """Train a judge on generated videos, evaluate it on held-out ones, save weights and card to
    out_dir; returns the metrics dict (also in the card). Arguments left None come from `config`
    (default JudgeTrainConfig()); `overrides` set any other JudgeTrainConfig field."""
    from .stream import ToyVideoStream

    cfg = dataclasses.replace(config or JudgeTrainConfig(), **{k: v for k, v in dict(
        steps=steps, batch_size=batch_size, seed=seed, device=device, **overrides).items() if v is not None})
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available (use device='cpu')")
    workers = cfg.num_workers
    if workers is None:
        cores = os.cpu_count() or 1
        workers = 0 if cores <= 2 else min(12, cores - 2)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its conv3d kernels once
    torch.manual_seed(cfg.seed)
    judge = Judge(cfg.model).to(dev)
    decay = [p for n, p in judge.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in judge.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99))
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in judge.parameters())
    print(f"judge: {n_params / 1e6:.2f} M params, {cfg.steps} steps x {cfg.batch_size} videos on {dev}, {workers} workers", flush=True)

    t0, loss_ema, step = time.time(), None, 0
    judge.train()
    for batch in _loader(ToyVideoStream(seed=cfg.seed, split="train"), cfg.batch_size, workers, dev):
        # inputs: uint8 -> [-1, 1], plus noise of a random strength per video
        x = video_to_float(batch["video"].to(dev, non_blocking=True))  # (B, 3, F, H, W)
        if cfg.noise_std > 0:
            sigma = torch.rand(len(x), 1, 1, 1, 1, device=dev, generator=noise_gen) * cfg.noise_std
            x = (x + sigma * torch.randn(x.shape, device=dev, generator=noise_gen)).clamp(-1, 1)
        labels = {h: v.to(dev, non_blocking=True) for h, v in batch["labels"].items()}
        # forward, loss, update
        lr = lr_at(step, cfg, time.time() - t0)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = judge_loss(judge(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # log
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        step += 1
        out_of_time = cfg.max_minutes is not None and time.time() - t0 >= 60.0 * cfg.max_minutes
        if step % cfg.log_every == 0 or step == cfg.steps or out_of_time:
            print(f"step {step}/{cfg.steps} loss {loss_ema:.4f} lr {lr:.2e} "
                  f"{(time.time() - t0) / step:.3f} s/step", flush=True)
        if step >= cfg.steps or out_of_time:
            break
    train_seconds = time.time() - t0

    metrics = evaluate_judge(judge, cfg.eval_samples, cfg.eval_seed, cfg.batch_size, workers)
    metrics.update(train_seconds=round(train_seconds, 1), final_loss=loss_ema, steps=step, params=n_params)
    card = {
        "recipe": asdict(cfg),
        "metrics": metrics,
        "trained_on": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    save_judge(judge.cpu(), out_dir, card)
    print(json.dumps(metrics, indent=1), flush=True)
    return metrics


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m turbo_train.toyworld.judge",
        description="Train the toy-world judge on generated videos; writes judge.safetensors + judge.json to --out-dir "
        "and prints held-out per-attribute accuracy.",
    )
    p.add_argument("--recipe", type=Path, default=None, help="YAML recipe (e.g. recipes/toy/judge.yaml); flags override it")
    p.add_argument("--out-dir", type=Path, required=True, help="where judge.safetensors and judge.json go")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: recipe, else 4000)")
    p.add_argument("--batch-size", type=int, default=None, help="videos per step (default: recipe, else 256)")
    p.add_argument("--seed", type=int, default=None, help="training data and init seed (default: recipe, else 0)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:N (default: recipe, else cuda)")
    p.add_argument("--num-workers", type=int, default=None, help="video-generating DataLoader processes")
    p.add_argument("--eval-samples", type=int, default=None, help="held-out videos to score")
    args = p.parse_args(argv)
    extra = {"num_workers": args.num_workers, "eval_samples": args.eval_samples}
    cfg = JudgeTrainConfig.from_yaml(args.recipe) if args.recipe else JudgeTrainConfig()
    train_judge(args.out_dir, args.steps, args.batch_size, args.seed, args.device, config=cfg, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
