"""Ulysses sequence parallel: 2 CPU processes (gloo) give the same output and gradients as 1."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from turbo_infer.models.wan import WanConfig, WanModel

CFG = dict(dim=48, ffn_dim=64, num_heads=4, num_layers=2, text_dim=16, in_channels=4, out_channels=4, freq_dim=32)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make():
    torch.manual_seed(0)
    m = WanModel(WanConfig(**CFG))
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.1)
    g = torch.Generator().manual_seed(1)
    # F*H*W/4 = 3*6*6/4 = 27 tokens: odd, so the shard must pad
    x = torch.randn(2, 4, 3, 6, 6, generator=g)
    t = torch.tensor([700.0, 20.0])
    ctx = torch.randn(2, 5, 16, generator=g)
    return m, x, t, ctx


def _worker(rank, world, port, out_path):
    from turbo_infer.sequence_parallel import enable_sequence_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m, x, t, ctx = _make()
    enable_sequence_parallel(m)
    out = m(x, t, ctx)
    out.square().sum().backward()
    grad = m.blocks[0].self_attn.q.weight.grad
    dist.all_reduce(grad)  # what DDP/FSDP does across the SP group: each rank holds its tokens' share
    if rank == 0:
        torch.save({"out": out.detach(), "grad": m.blocks[0].self_attn.q.weight.grad}, out_path)
    # leave together, as turbo-train does: a rank that tears gloo down while its peer is still
    # saving can abort (seen once under a loaded CI: SIGABRT, "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def test_ulysses_two_processes_match_single(tmp_path):
    m, x, t, ctx = _make()
    ref = m(x, t, ctx)
    ref.square().sum().backward()
    # The loss is computed on the gathered output on every rank, but _Gather's backward keeps only this
    # rank's slice, so each rank's weight gradient is the share of its own tokens: their sum = full grad.
    out_path = tmp_path / "sp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out_path)), nprocs=2, join=True)
    got = torch.load(out_path)
    torch.testing.assert_close(got["out"], ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grad"], m.blocks[0].self_attn.q.weight.grad, rtol=1e-4, atol=1e-5)


def test_heads_must_divide():
    from turbo_infer.sequence_parallel import UlyssesAttention, SequenceShard

    class FakeShard:
        world, seq_len, group = 3, 8, None

    att = UlyssesAttention(torch.nn.Identity(), FakeShard())
    with pytest.raises(ValueError, match="divisible"):
        att(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
