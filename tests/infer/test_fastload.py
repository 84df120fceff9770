"""turbo_infer.fastload: the staged safetensors reader against safetensors' own loader.

The staged path runs on the CPU here (ordinary host buffers instead of pinned ones; the copies are
synchronous), with chunks far smaller than the tensors so that tensors straddle chunk boundaries and
chunks hold several tensors: the byte bookkeeping is the same as on a GPU."""
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbo_infer.fastload import load_safetensors, read_header


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(37, 19, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(5, 3, 7, generator=g),
        "w.fp8": torch.randn(64, 16, generator=g).to(torch.float8_e4m3fn),
        "q.int8": torch.randint(-128, 127, (33,), dtype=torch.int8, generator=g),
        "mask": torch.rand(11, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "big.f16": torch.randn(300, 41, generator=g).half(),
    }


@pytest.mark.parametrize("chunk,workers", [(1, 1), (7, 1), (100, 1), (4096, 1), (1 << 20, 1), (7, 3), (4096, 4),
                                           (1 << 20, 16)])
def test_staged_read_equals_safetensors(tmp_path, chunk, workers):
    """One reader, or several on contiguous shares of the data (tensors straddle the shares' borders;
    16 readers for 30 KB: shares smaller than some tensors)."""
    f = tmp_path / "m.safetensors"
    save_file(_tensors(), str(f), metadata={"format": "pt"})
    ref = load_file(str(f))
    got = load_safetensors(f, "cpu", staged=True, chunk_bytes=chunk, workers=workers)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), k
    mapped = load_safetensors(f, "cpu")  # the default on the CPU: safe_open's mapping
    assert all(torch.equal(mapped[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)) for k, v in ref.items())


def test_damaged_files_name_the_file_and_read_nothing(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file(_tensors(), str(f))
    raw = f.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-100])  # data region shorter than the header says
    with pytest.raises(ValueError, match="cut.safetensors.*truncated or damaged"):
        load_safetensors(cut, "cpu", staged=True)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        load_safetensors(f, "cpu", staged=True, workers=0)
    head = tmp_path / "head.safetensors"
    head.write_bytes(raw[:20])
    with pytest.raises(ValueError, match="head.safetensors.*header length"):
        load_safetensors(head, "cpu", staged=True)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(ValueError, match="tiny.safetensors.*not a safetensors file"):
        read_header(tiny)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 8)
    with pytest.raises(ValueError, match="junk.safetensors.*unreadable"):
        read_header(junk)
    bad = tmp_path / "bad.safetensors"
    header = b'{"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(ValueError, match="bad.safetensors.*'x'.*dtype must be one of"):
        read_header(bad)
    with pytest.raises(ValueError, match="chunk_bytes"):
        load_safetensors(f, "cpu", staged=True, chunk_bytes=0)


def test_staged_read_falls_back_to_the_mapping_on_runtime_errors(tmp_path, monkeypatch, caplog):
    # e.g. pinned host memory refused on a GPU host: the file is still read, through safe_open
    import turbo_infer.fastload as fl

    f = tmp_path / "m.safetensors"
    save_file(_tensors(), str(f))

    def refuse(*a, **k):
        raise RuntimeError("no pinned memory")

    monkeypatch.setattr(fl, "_stream_chunks", refuse)
    with caplog.at_level("WARNING", logger="turbo_infer.fastload"):
        got = load_safetensors(f, "cpu", staged=True)
    assert "staged read failed" in caplog.text and "m.safetensors" in caplog.text
    ref = load_file(str(f))
    assert all(torch.equal(got[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)) for k, v in ref.items())
