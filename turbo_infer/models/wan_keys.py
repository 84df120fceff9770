"""Checkpoint I/O for the Wan DiT: key layouts (official Wan <-> diffusers), file formats, configs.

Layouts:
  official   blocks.N.self_attn.q / cross_attn.k / norm3 (cross-attn norm) / ffn.0 / modulation,
             text_embedding.0, time_embedding.0, time_projection.1, head.head, head.modulation
  diffusers  blocks.N.attn1.to_q / attn2.to_k / norm2 / ffn.net.0.proj / scale_shift_table,
             condition_embedder.{text_embedder,time_embedder}.linear_1, condition_embedder.time_proj,
             proj_out, scale_shift_table
Our modules use the official names. Files: one `.safetensors`, a sharded `*.safetensors.index.json`,
a `.pt/.pth` (loaded with weights_only=True), or a directory holding one of those (diffusers
directories hold `config.json` + `diffusion_pytorch_model*.safetensors`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from turbo_infer.files import publish_file

# (official regex, diffusers replacement) — applied in order; block-level rules carry the block prefix.
_OFFICIAL_TO_DIFFUSERS = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^(blocks\.\d+)\.self_attn\.([qkv])\.", r"\1.attn1.to_\2."),
    (r"^(blocks\.\d+)\.self_attn\.o\.", r"\1.attn1.to_out.0."),
    (r"^(blocks\.\d+)\.self_attn\.", r"\1.attn1."),
    (r"^(blocks\.\d+)\.cross_attn\.([qkv])\.", r"\1.attn2.to_\2."),
    (r"^(blocks\.\d+)\.cross_attn\.o\.", r"\1.attn2.to_out.0."),
    (r"^(blocks\.\d+)\.cross_attn\.", r"\1.attn2."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),
    (r"^(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"^(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
]
_DIFFUSERS_TO_OFFICIAL = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def is_diffusers_layout(state: dict) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k or k == "proj_out.weight" for k in state)


def official_to_diffusers(state: dict) -> dict:
    return {_rename(k, _OFFICIAL_TO_DIFFUSERS): v for k, v in state.items()}


def diffusers_to_official(state: dict) -> dict:
    return {_rename(k, _DIFFUSERS_TO_OFFICIAL): v for k, v in state.items()}


# ----------------------------------------------------------------------------- files


def _load_file(path: Path) -> tuple[dict, dict]:
    """One weights file -> (tensors, safetensors metadata)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # truncated / not a safetensors file
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot read torch checkpoint ({e})") from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
        return obj, {}
    raise ValueError(f"{path}: unsupported weights format (want .safetensors, .safetensors.index.json, .pt/.pth)")


def _load_index(path: Path) -> tuple[dict, dict]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a valid sharded-checkpoint index ({e})") from e
    state, meta = {}, {}
    for shard in sorted(set(weight_map.values())):
        tensors, m = _load_file(path.parent / shard)
        state.update(tensors)
        meta.update(m)
    missing = set(weight_map) - set(state)
    if missing:
        raise ValueError(f"{path}: shards lack tensors listed in the index, e.g. {sorted(missing)[:3]}")
    return state, meta


def _config_from_json(d: dict) -> dict | None:
    """A WanConfig dict from a diffusers or official Wan `config.json` (None if unrecognized)."""
    if "num_attention_heads" in d:  # diffusers WanTransformer3DModel
        return dict(
            dim=d["num_attention_heads"] * d["attention_head_dim"], ffn_dim=d["ffn_dim"], num_heads=d["num_attention_heads"],
            num_layers=d["num_layers"], text_dim=d.get("text_dim", 4096), in_channels=d.get("in_channels", 16),
            out_channels=d.get("out_channels") or d.get("in_channels", 16), freq_dim=d.get("freq_dim", 256),
            patch_size=tuple(d.get("patch_size", (1, 2, 2))), eps=d.get("eps", 1e-6), cross_attn_norm=d.get("cross_attn_norm", True),
        )
    if "num_heads" in d and "dim" in d:  # official Wan
        return dict(
            dim=d["dim"], ffn_dim=d["ffn_dim"], num_heads=d["num_heads"], num_layers=d["num_layers"],
            text_dim=d.get("text_dim", 4096), in_channels=d.get("in_dim", 16), out_channels=d.get("out_dim", 16),
            freq_dim=d.get("freq_dim", 256), patch_size=tuple(d.get("patch_size", (1, 2, 2))), eps=d.get("eps", 1e-6),
            cross_attn_norm=d.get("cross_attn_norm", True),
        )
    return None


def load_wan_state_dict(path) -> tuple[dict, dict | None]:
    """Read a Wan checkpoint in any supported layout/format.

    Returns (state dict in the official layout, WanConfig dict or None if the files carry none)."""
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            config = _config_from_json(json.loads(cfg_file.read_text()))
        candidates = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
        if not candidates:
            raise FileNotFoundError(f"{path}: directory holds no .safetensors, .safetensors.index.json or .pt/.pth weights")
        if candidates[0].name.endswith(".index.json"):
            state, meta = _load_index(candidates[0])
        elif len(candidates) == 1:
            state, meta = _load_file(candidates[0])
        else:
            raise ValueError(f"{path}: several weight files and no index.json: {[c.name for c in candidates]}")
    elif path.name.endswith(".index.json"):
        state, meta = _load_index(path)
    else:
        state, meta = _load_file(path)
    if "wan_config" in meta:  # written by turbo (save_wan_checkpoint)
        config = json.loads(meta["wan_config"])
    if is_diffusers_layout(state):
        state = diffusers_to_official(state)
    return state, config


def infer_config(state: dict, path="checkpoint") -> str:
    """The preset whose shapes match `state` (heads are not recoverable from shapes alone)."""
    try:
        dim = state["patch_embedding.weight"].shape[0]
        in_ch = state["patch_embedding.weight"].shape[1]
        ffn = state["blocks.0.ffn.0.weight"].shape[0]
        text = state["text_embedding.0.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"{path}: not a Wan DiT checkpoint (missing {e})") from None
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    from turbo_infer.models.wan import WAN_CONFIGS

    for name, c in WAN_CONFIGS.items():
        if (c.dim, c.in_channels, c.ffn_dim, c.text_dim, c.num_layers) == (dim, in_ch, ffn, text, layers):
            return name
    raise ValueError(
        f"{path}: shapes (dim={dim}, layers={layers}, ffn={ffn}, text_dim={text}) match no preset "
        f"{sorted(WAN_CONFIGS)} and no config.json was found: pass config=..."
    )


def save_wan_checkpoint(model, path, layout: str = "official", extra_metadata: dict | None = None) -> None:
    """Write `model`'s weights to one safetensors file atomically, with its WanConfig in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        state = official_to_diffusers(state)
    elif layout != "official":
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    meta = {"wan_config": json.dumps(model.config.to_dict()), **(extra_metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    publish_file(tmp, path)
