"""Wan2.1's VAE decoder in plain PyTorch: decoding without importing diffusers (and, through it,
transformers) on the runtime's path — seconds of the time to first video (BENCHMARKS.md "End to end").

Reads the diffusers `AutoencoderKLWan` safetensors layout (`post_quant_conv.*`, `decoder.*`; the encoder's
tensors are not used) and decodes as diffusers does (tests/infer/test_wan_vae.py checks it against
`AutoencoderKLWan.decode` at tiny configs): one latent frame at a time, every causal 3D convolution
carrying the last two frames of its input from the previous frame's pass (zeros before the first), so
memory stays that of one latent frame's activations. A latent of F frames decodes to 1 + 4·(F − 1) video
frames: the two temporal upsamplers leave the first latent frame at one frame and double the others.

Blocks, as Wan2.1 builds them (dims = base_dim · [m_last, m_last, ..., m_1] from dim_mult reversed):
conv_in (3³ causal) → mid (residual, single-head spatial attention per frame, residual) → up blocks
(num_res_blocks + 1 residual blocks each, then a 2x spatial upsample with a 3x3 conv, and in the
temporal stages a (3,1,1) causal conv that doubles the frames) → RMS norm, SiLU, conv_out (3³ causal).
Residual block: RMS norm, SiLU, causal conv, RMS norm, SiLU, causal conv, plus a 1³ shortcut when the
width changes. "RMS norm" here is Wan's: x / ‖x‖ over channels · √C · γ (fp32 for half inputs).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2  # frames of its input a causal conv keeps for the next latent frame's pass
_REP = "first"  # a temporal upsampler's cache slot after the first latent frame (which it does not upsample)


class _Cache:
    """Per decode: one slot per cached layer, visited in the same order on every latent frame."""

    def __init__(self):
        self.slots: list = []
        self.i = 0

    def start_frame(self) -> None:
        self.i = 0

    def take(self):
        """(slot index, what the slot held from the previous frame: None on the first)."""
        if self.i == len(self.slots):
            self.slots.append(None)
        self.i += 1
        return self.i - 1, self.slots[self.i - 1]


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (2·p_t zero frames in front, none behind), symmetric in space; a
    cached pass prepends the previous frame's last input frames instead of zeros."""

    def __init__(self, cin: int, cout: int, kernel, padding=0, stride=1):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self._pad = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self._pad)
        if cache is not None and pad[4] > 0:
            x = torch.cat([cache.to(x.device), x], dim=2)
            pad[4] -= cache.shape[2]
        return super().forward(F.pad(x, pad))

    def cached(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        """This conv on one latent frame's activations x (B, C, t, H, W), keeping its last input frames."""
        i, prev = cache.take()
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T and prev is not None:
            keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
        out = self(x, prev)
        cache.slots[i] = keep
        return out


class RMSNorm(nn.Module):
    """Wan's channel RMS norm: normalize(x, dim=1) · √C · γ; γ of shape (C, 1, 1[, 1])."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        y = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin, images=False)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout, images=False)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        h = self.conv_shortcut(x)
        x = self.conv1.cached(F.silu(self.norm1(x)), cache)
        x = self.conv2.cached(F.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        h = self.norm(x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W))
        qkv = self.to_qkv(h).reshape(B * T, 1, 3 * C, H * W).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # (BT, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.squeeze(1).permute(0, 2, 1).reshape(B * T, C, H, W))
        return x + h.view(B, T, C, H, W).permute(0, 2, 1, 3, 4)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Upsample(nn.Module):
    """2x nearest-exact spatial upsampling + 3x3 conv to half the channels, per frame; temporal
    (`upsample3d`): before that, a (3,1,1) causal conv to twice the channels whose two halves become
    two frames — except on the first latent frame, which stays one frame."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if self.temporal:
            i, prev = cache.take()
            if prev is None:  # the first latent frame: no temporal upsampling
                cache.slots[i] = _REP
            else:
                keep = x[:, :, -CACHE_T:].clone()
                if keep.shape[2] < CACHE_T:
                    before = torch.zeros_like(keep) if prev is _REP else prev[:, :, -1:].to(keep.device)
                    keep = torch.cat([before, keep], dim=2)
                x = self.time_conv(x, None if prev is _REP else prev)
                cache.slots[i] = keep
                x = torch.stack((x[:, :C], x[:, C:]), dim=3).reshape(B, C, 2 * T, H, W)  # frame t -> 2t, 2t+1
        T = x.shape[2]
        y = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        y = self.resample[1](self.resample[0](y.float()).type_as(y))
        return y.view(B, T, y.shape[1], 2 * H, 2 * W).permute(0, 2, 1, 3, 4)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1)])
        self.upsamplers = (nn.ModuleList([Upsample(cout, upsample == "upsample3d")]) if upsample else None)

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temporal_upsample: list[bool], out_channels: int = 3):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous stage's upsampler halved the channels
            up = None
            if i != len(dim_mult) - 1:
                up = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, num_res_blocks, up))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        x = self.mid_block(self.conv_in.cached(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out.cached(F.silu(self.norm_out(x)), cache)


# the diffusers config keys this decoder follows, and the values of Wan2.1's layout it requires
_REQUIRED = {"is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3}


class WanVAEDecoder(nn.Module):
    """`post_quant_conv` + `decoder` of a diffusers AutoencoderKLWan (Wan2.1 layout); `decode(z)` takes the
    raw (un-normalized) latent (B, z_dim, F, h, w) and returns the video (B, 3, 1 + 4(F-1), 8h, 8w) clamped
    to [-1, 1], in the module's dtype."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        z = int(config["z_dim"])
        temporal_down = [bool(t) for t in config["temperal_downsample"]]
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(int(config.get("decoder_base_dim") or config["base_dim"]), z,
                                 [int(m) for m in config["dim_mult"]], int(config["num_res_blocks"]),
                                 temporal_down[::-1], int(config.get("out_channels", 3)))

    @classmethod
    def check_config(cls, config: dict, source="config.json") -> dict:
        """The config if this decoder reproduces it, else ValueError naming the field (e.g. Wan2.2's
        residual layout, which the runtime leaves to diffusers)."""
        for key in ("z_dim", "base_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
            if key not in config:
                raise ValueError(f"{source}: field {key!r} missing")
        for key, want in _REQUIRED.items():
            if config.get(key, want) != want:
                raise ValueError(f"{source}: field {key!r} is {config[key]!r}; the runtime's Wan VAE decoder "
                                 f"follows Wan2.1 ({want!r})")
        if len(config["temperal_downsample"]) != len(config["dim_mult"]) - 1:
            raise ValueError(f"{source}: temperal_downsample needs len(dim_mult) - 1 entries")
        return config

    @classmethod
    def from_dir(cls, vae_dir, device, dtype, tensors: dict | None = None,
                 config: dict | None = None) -> "WanVAEDecoder":
        """Built on the meta device from `vae_dir`/config.json (or `config`, that file already parsed) and
        filled from its safetensors file (`turbo_infer.fastload`: staged reads on CUDA) or from `tensors`
        already read onto `device`; ValueError naming the file when the config or the tensors do not fit."""
        from turbo_infer.fastload import assign_state, read_files

        vae_dir = Path(vae_dir)
        if config is None:
            try:
                config = json.loads((vae_dir / "config.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{vae_dir / 'config.json'}: unreadable ({e})") from None
        cls.check_config(config, str(vae_dir / "config.json"))
        weights = vae_dir / "diffusion_pytorch_model.safetensors"
        if tensors is None:
            if not weights.is_file():
                raise ValueError(f"{weights}: missing (the runtime's decoder reads safetensors only)")
            tensors = read_files([weights], device)
        state = {k: v for k, v in tensors.items() if k.startswith(("decoder.", "post_quant_conv."))}
        with torch.device("meta"):
            model = cls(config)
        try:
            missing, unexpected = assign_state(model, state, dtype)
        except RuntimeError as e:  # shapes that differ from the config's
            raise ValueError(f"{weights}: does not match its config.json ({str(e).splitlines()[1].strip()})") from None
        if missing or unexpected:
            raise ValueError(f"{weights}: does not match a Wan2.1 VAE decoder: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def decode_chunks(self, z: torch.Tensor):
        """The video of `decode(z)` as it is made: one (B, 3, f, H, W) chunk per latent frame (f = 1 for the
        first, 4 after), clamped to [-1, 1]; the causal cache carries the context from chunk to chunk."""
        x = self.post_quant_conv(z)
        cache = _Cache()
        for i in range(x.shape[2]):
            cache.start_frame()
            yield self.decoder(x[:, :, i:i + 1], cache).clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.decode_chunks(z)), dim=2)


__all__ = ["CausalConv3d", "WanVAEDecoder"]
