"""Test doubles shared by the training tests (imported as `from fakes import ...`: pytest puts this
folder on sys.path)."""
import zlib

import torch
from torch.utils.data import IterableDataset


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


class FixedBatches(IterableDataset):
    """The same tiny batch of latents (B, *latent) and text states (B, text_len, text_dim), forever."""

    def __init__(self, batch: int, latent: tuple, text_len: int, text_dim: int):
        g = torch.Generator().manual_seed(7)
        self.batch = {"latent": 0.5 * torch.randn(batch, *latent, generator=g),
                      "context": torch.randn(batch, text_len, text_dim, generator=g)}

    def __iter__(self):
        while True:
            yield self.batch


def run_cli(main, args, capsys):
    """main(args) -> (exit code, stdout, stderr), a SystemExit's code included."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
