"""Test doubles shared by the training tests (imported as `from fakes import ...`: pytest puts this
folder on sys.path)."""
import zlib

import torch


class FakeTextEncoder:
    """Stand-in for MiniLM: a caption's (L, 384) states are seeded by its crc32; '' gives zeros."""

    def __init__(self, length: int = 8, dim: int = 384):
        self.length, self.dim = length, dim
        self.calls = 0

    def encode(self, prompts):
        self.calls += 1
        out = []
        for p in prompts:
            if not p:
                out.append(torch.zeros(self.length, self.dim))
            else:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                out.append(torch.randn(self.length, self.dim, generator=g))
        return torch.stack(out)

    def empty_embedding(self):
        return self.encode([""])
