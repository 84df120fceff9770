"""What every training module does to a batch: captions -> text states (the recipe's text encoder,
built on first use), videos -> latents (the codec), as one mixin for the flow-matching, rCM and SLA
modules. Imports nothing from turbo_train.recipe (the recipe imports the method modules)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from turbo_train.recipe import ModelConfig


def encode_batch(batch: dict, codec, encode_text: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch -> (x0 latents (B, C, F, H, W) float32, text states (B, L, D) float32).

    batch: {"latent"} or {"video"} (uint8 toy videos, encoded by `codec`: (B, 48, F, H/4, W/4) for the
    toy codec), and {"context"} or {"caption"} (encoded by encode_text(captions)). Shared by every
    method's module (flow matching, rCM, SLA)."""
    if "latent" in batch:
        x0 = batch["latent"].float()
    elif "video" in batch:
        x0 = codec.encode(video_to_model_space(batch["video"])).float()
    else:
        raise ValueError(f"batch needs 'video' or 'latent', got keys {sorted(batch)}")
    if "context" in batch:
        context = batch["context"].float()
    elif "caption" in batch:
        context = encode_text(list(batch["caption"])).float()
    else:
        raise ValueError(f"batch needs 'caption' or 'context', got keys {sorted(batch)}")
    if context.shape[0] != x0.shape[0]:
        raise ValueError(f"batch has {x0.shape[0]} samples but {context.shape[0]} captions/contexts")
    return x0, context


def build_text_encoder(cfg: ModelConfig, device):
    """The recipe's text encoder on `device` (fp32, with its embedding cache)."""
    if cfg.text_encoder == "minilm":
        from turbo_infer.text_encoders import MiniLMTextEncoder

        return MiniLMTextEncoder(device=device, path=cfg.text_encoder_path, max_length=cfg.text_max_length,
                                 cache_size=cfg.text_cache_size)
    raise ValueError(f"model.text_encoder: unsupported encoder {cfg.text_encoder!r}")


def video_to_model_space(video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float32 (B, 3, F, H, W) in [-1, 1]; a float (B, 3, F, H, W) passes."""
    if video.dtype == torch.uint8:
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"batch['video'] uint8 must be (B, F, H, W, 3), got {tuple(video.shape)}")
        return video.float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
    if not video.is_floating_point() or video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"batch['video'] must be uint8 (B, F, H, W, 3) or float (B, 3, F, H, W), got "
                         f"{tuple(video.shape)} {video.dtype}")
    return video.float()


class BatchEncoderMixin:
    """The text encoder (built on first use) and the batch -> (latents, text states) step that every
    training module shares. Needs self.recipe and self.device; init_encoders() sets the rest."""

    def init_encoders(self, text_encoder=None, codec=None) -> None:
        """text_encoder: None = the recipe's, built on first use; codec: None = the toy codec."""
        self._text_encoder = text_encoder
        if codec is None:
            from turbo_infer.vae import ToyCodec

            codec = ToyCodec()
        self.codec = codec

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            self._text_encoder = build_text_encoder(self.recipe.model, self.device)
        return self._text_encoder

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, L, D) float32 text states on this device (fp32: no autocast, so cached and
        fresh embeddings agree with what inference computes)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.text_encoder.encode(list(captions)).to(self.device, torch.float32)

    @torch.no_grad()
    def encode_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch -> (x0 latents (B, C, F, H, W) float32, text states (B, L, D) float32) on this device."""
        with torch.autocast(self.device.type, enabled=False):
            x0, context = encode_batch(batch, self.codec, self.encode_text)
        return x0.to(self.device), context.to(self.device)
