"""Video codecs between pixels and the DiT's latent space.

    WanVAE    Wan2.1's causal 3D VAE from a local directory in diffusers' `AutoencoderKLWan` layout (decoded
              by the runtime's own decoder, encoded through diffusers);
              latents normalized per channel with the config's latents_mean / latents_std exactly as
              diffusers' WanPipeline does (z_norm = (z - mean) / std; decode undoes it).
    ToyCodec  the toy world's codec: a fixed, lossless 4x4 space-to-depth permutation, no weights.

Both expose: `latent_channels`, `spatial_factor`, `temporal_factor`, `latent_shape(F, H, W)`,
`check_size(F, H, W)` (ValueError naming the bad argument), `encode(video) -> latents`,
`decode(latents) -> video` with video (B, 3, F, H, W) float in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path

import torch


def _check_video(video: torch.Tensor, name: str = "video") -> None:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, F, H, W), got {tuple(video.shape)}")


# ---------------------------------------------------------------------------------------------
# Toy codec
# ---------------------------------------------------------------------------------------------
class ToyCodec:
    """Lossless space-to-depth codec: (B, 3, F, H, W) -> (B, 3*4*4, F, H/4, W/4), times 2.

    Latent channel c*16 + 4*i + j holds 2 x pixel (4*h + i, 4*w + j) of color channel c: a
    permutation and a power-of-two scale, so decode(encode(v)) == v exactly. The factor 2 brings toy
    latents near unit scale (pixels in [-1, 1] have RMS 0.54 over toy videos; latents RMS 1.08,
    range [-2, 2]), the scale the flow time distribution, the sampler's shift and rCM's TrigFlow
    (sigma_data = 1) assume. With latents of RMS 0.5 the teacher's unavoidable noise-copying error
    was twice as large relative to the signal, and showed as 8x8-pixel (one token) block noise.
    No temporal compression.
    """

    patch = 4
    scale = 2.0  # latent = scale * pixel (a power of two: exact in any float format)
    spatial_factor = 4
    temporal_factor = 1
    latent_channels = 3 * 4 * 4

    def to(self, *args, **kwargs) -> "ToyCodec":  # stateless: nothing to move
        return self

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("height", height), ("width", width)):
            if v % self.patch:
                raise ValueError(f"{name}={v} is not divisible by the toy codec's factor {self.patch}")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the latent of a num_frames x height x width video."""
        self.check_size(num_frames, height, width)
        return (self.latent_channels, num_frames, height // self.patch, width // self.patch)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video)
        B, C, F, H, W = video.shape
        self.check_size(F, H, W)
        p = self.patch
        x = video.reshape(B, C, F, H // p, p, W // p, p)  # (B, C, F, H/p, i, W/p, j)
        x = x.permute(0, 1, 4, 6, 2, 3, 5)  # (B, C, i, j, F, H/p, W/p)
        return x.reshape(B, C * p * p, F, H // p, W // p) * self.scale  # (B, 48, F, H/4, W/4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        p = self.patch
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (B, {self.latent_channels}, F, h, w), got {tuple(latents.shape)}")
        B, _, F, h, w = latents.shape
        x = latents.reshape(B, 3, p, p, F, h, w)  # (B, C, i, j, F, h, w)
        x = x.permute(0, 1, 4, 5, 2, 6, 3)  # (B, C, F, h, i, w, j)
        # clamp is the identity on encoded videos (exact round trip) and bounds generated latents
        return (x.reshape(B, 3, F, h * p, w * p) / self.scale).clamp(-1.0, 1.0)

    def decode_chunks(self, latents: torch.Tensor):
        """`decode` as one chunk (the toy codec is a reshape: nothing to stream)."""
        yield self.decode(latents)


# ---------------------------------------------------------------------------------------------
# Wan VAE
# ---------------------------------------------------------------------------------------------
def _resolve_vae_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"Wan VAE directory not found: {path}")
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():  # a diffusers Wan repo root
        return path / "vae"
    raise FileNotFoundError(f"no config.json in Wan VAE directory {path} (nor in {path}/vae)")


def conv3d_memory_format(module, memory_format) -> None:
    """Lay out every Conv3d weight of `module` (Wan's causal convs) in `memory_format`; its conv2d
    weights are 4-D and stay as they are."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=memory_format)


def load_vae_staged(model_cls, vae_dir: Path, device, dtype, *, staged: bool = True):
    """A diffusers model built on the meta device and filled on `device` from its single safetensors
    file by `turbo_infer.fastload` (the GPU path of WanVAE). None where that cannot load exactly (no such
    file, keys that do not match, anything left on the meta device): the caller uses from_pretrained."""
    from turbo_infer.fastload import fill_meta_model, meta_tensors

    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return None
    with torch.device("meta"):
        model = model_cls.from_config(model_cls.load_config(str(vae_dir)))
    missing, unexpected = fill_meta_model(model, [weights], device, dtype, staged=staged)
    if missing or unexpected or meta_tensors(model):
        return None
    return model.eval()


class WanVAE:
    """Wan2.1 VAE from a local directory in diffusers' `AutoencoderKLWan` layout.

    Decoding runs the runtime's own decoder (`turbo_infer.models.wan_vae.WanVAEDecoder`: no diffusers
    import) when the config is Wan2.1's and the weights are safetensors (`native` is then True);
    otherwise, and for `encode`, diffusers' AutoencoderKLWan (built on first use for encoding).

    Args:
        path: directory with the diffusers config.json + weights, or a diffusers Wan repo root
            holding vae/.
        device, dtype: where/how the VAE runs (the Wan pipeline runs it in fp32).
        channels_last: lay the causal Conv3d weights out channels-last (cuDNN then picks NDHWC kernels);
            None = on CUDA only. Measured decode of a 21x60x104 latent: 2.60 s vs 2.78 s on an H200,
            3.01 s vs 3.24 s on an H100 (tools/bench_e2e.py, random weights; benchmarks/e2e.json).
    `encode` returns normalized latents (B, z_dim, (F-1)/4+1, H/8, W/8) using the posterior mean
    (deterministic) unless `sample=True`; `decode` returns a float32 video clamped to [-1, 1].
    """

    def __init__(self, path, device="cpu", dtype=torch.float32, channels_last: bool | None = None):
        import json

        self.vae_dir = _resolve_vae_dir(Path(path))
        self.device = torch.device(device)
        self.dtype = dtype
        try:
            cfg = json.loads((self.vae_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.vae_dir / 'config.json'}: unreadable ({e})") from None
        self.config = cfg
        self._full = None  # diffusers' AutoencoderKLWan, for encode (and decode where native is off)
        self.model = self._native_decoder()
        self.native = self.model is not None
        if not self.native:
            self.model = self._diffusers_model()
        self.set_channels_last(self.device.type == "cuda" if channels_last is None else bool(channels_last))
        self.latent_channels = int(cfg.get("z_dim", 16))
        # the architecture fixes the factors: one 2x spatial downsample per stage after the first,
        # one 2x temporal downsample per True in temperal_downsample (Wan2.1: 8 and 4)
        self.spatial_factor = 2 ** (len(cfg.get("dim_mult", [1, 2, 4, 4])) - 1)
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.get("temperal_downsample", [False, True, True]))
        model_cfg = getattr(self.model, "config", cfg)
        get = model_cfg.get if isinstance(model_cfg, dict) else lambda k: getattr(model_cfg, k)
        self.latents_mean = torch.tensor(get("latents_mean"), dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(get("latents_std"), dtype=torch.float32).view(1, -1, 1, 1, 1)

    def _native_decoder(self):
        """The runtime's decoder, or None (logged) where it does not reproduce this VAE."""
        import logging

        from turbo_infer.models.wan_vae import WanVAEDecoder

        if "latents_mean" not in self.config or "latents_std" not in self.config:
            return None  # diffusers' defaults apply: leave them to diffusers
        try:
            return WanVAEDecoder.from_dir(self.vae_dir, self.device, self.dtype, config=self.config)
        except (ValueError, OSError, RuntimeError) as e:
            logging.getLogger(__name__).warning("Wan VAE %s: not decoded by the runtime's own decoder (%s); using "
                                                "diffusers", self.vae_dir, e)
            return None

    def _diffusers_model(self):
        """diffusers' AutoencoderKLWan from the directory (staged onto a GPU), in this VAE's device/dtype."""
        try:
            from diffusers import AutoencoderKLWan
        except ImportError as e:  # pragma: no cover - diffusers is needed only for encode / other layouts
            raise ImportError("WanVAE needs diffusers for encoding and for VAEs other than Wan2.1's layout "
                              "(pip install diffusers)") from e
        model = None
        if self.device.type == "cuda":  # straight onto the GPU (turbo_infer.fastload)
            from turbo_infer.fastload import staged_or_none

            model = staged_or_none(f"Wan VAE {self.vae_dir}",
                                   lambda: load_vae_staged(AutoencoderKLWan, self.vae_dir, self.device, self.dtype))
        if model is None:
            model = AutoencoderKLWan.from_pretrained(str(self.vae_dir), torch_dtype=self.dtype)
        return model.to(self.device, self.dtype).eval().requires_grad_(False)

    @property
    def full_model(self):
        """diffusers' AutoencoderKLWan (encoder and decoder): loaded on first use when decoding is native."""
        if not self.native:
            return self.model
        if self._full is None:
            self._full = self._diffusers_model()
        return self._full

    def to(self, device=None, dtype=None) -> "WanVAE":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.model.to(device=self.device, dtype=self.dtype)
        if self._full is not None:
            self._full.to(device=self.device, dtype=self.dtype)
        return self.set_channels_last(self.channels_last)

    def set_channels_last(self, on: bool) -> "WanVAE":
        """Lay the Conv3d weights out channels-last (on) or contiguous; kept across `to()`."""
        self.channels_last = bool(on)
        conv3d_memory_format(self.model, torch.channels_last_3d if on else torch.contiguous_format)
        return self

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"num_frames={num_frames} is invalid for the Wan VAE: num_frames - 1 must be "
                             f"divisible by {self.temporal_factor} (e.g. 1, 5, ..., 81)")
        for name, v in (("height", height), ("width", width)):
            if v % self.spatial_factor:
                raise ValueError(f"{name}={v} is not divisible by the Wan VAE's factor {self.spatial_factor}")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the latent: (16, (F-1)/4+1, H/8, W/8) for Wan2.1."""
        self.check_size(num_frames, height, width)
        return (self.latent_channels, (num_frames - 1) // self.temporal_factor + 1,
                height // self.spatial_factor, width // self.spatial_factor)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """video (B, 3, F, H, W) in [-1, 1] -> normalized latents (B, z_dim, F', H', W') float32."""
        _check_video(video)
        self.check_size(*video.shape[2:])
        dist = self.full_model.encode(video.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z.float() - self.latents_mean.to(z.device)) / self.latents_std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, z_dim, F', H', W') -> video (B, 3, F, H, W) float32 in [-1, 1]."""
        return torch.cat(list(self.decode_chunks(latents)), dim=2)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor):
        """`decode` as it is made: float32 (B, 3, f, H, W) chunks in [-1, 1] along time (the runtime's
        decoder: one per latent frame, 1 then 4 frames each; diffusers' path: the whole video at once),
        so that a consumer (an mp4 writer) can start on the first frames while the rest decode."""
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (B, {self.latent_channels}, F, h, w), got {tuple(latents.shape)}")
        z = latents.float().to(self.device) * self.latents_std.to(self.device) + self.latents_mean.to(self.device)
        if self.native:
            for chunk in self.model.decode_chunks(z.to(self.dtype)):
                yield chunk.float()
        else:
            yield self.model.decode(z.to(self.dtype), return_dict=False)[0].float().clamp(-1.0, 1.0)
