"""A tiny toy-world-shaped DiT for the runtime's tests (dim 32, 2 blocks, MiniLM text width, toy latents)."""
import torch

from turbo_infer.models.wan import WanConfig, WanModel

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=384, in_channels=48, out_channels=48)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = WanModel(WanConfig(**{**TINY.to_dict(), **overrides})).eval()
    for p in model.parameters():  # Wan's init zeroes the head: give every weight some signal
        torch.nn.init.normal_(p, std=0.05)
    return model
