"""Read safetensors files onto a GPU through pinned staging buffers.

`safe_open(..., device="cuda")` maps the file and copies each tensor from the mapping to the GPU:
page faults over the mapping and pageable host-to-device copies. The time to first video measured
that path at ~1.1 GiB/s on an H200 host (umT5-XXL, 10.6 GiB, from the page cache: 9.2 s; the 1.4 GiB
DiT bundle 1.6 s with its hashing; BENCHMARKS.md "End to end"). Here the file's data region is read
sequentially in large chunks (`readinto`, no mapping) into two pinned host buffers, and each chunk's
bytes are copied asynchronously into the destination tensors' storage while the next chunk is read. A
large file is split into contiguous shares read by several threads at once (their reads release the
GIL), each reader on its own CUDA stream, so that two loads side by side (the umT5 prefetch beside
the DiT) do not queue on the default stream. Measured on an H200 host from the page cache: umT5-XXL
(10.6 GiB) in 1.15-1.4 s (7.6-9.2 GiB/s) with 4 or 8 readers alike; with 4 readers on the shared default
stream it had been 3.4-4.1 s (BENCHMARKS.md "End to end").

`load_safetensors(path, device)` returns {name: tensor} like `safetensors.torch.load_file`. On the CPU
it is `safe_open`'s zero-copy mapping; on CUDA the staged read. `staged=True` forces the staged path on
any device (the tests use it on the CPU, with ordinary host buffers). The header is checked against the
file before anything is read: a truncated or malformed file raises `ValueError` naming the file.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from contextlib import nullcontext
from pathlib import Path

import torch

# safetensors dtype names -> torch dtypes (the format's table, as safetensors.torch has it)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CHUNK_BYTES = 64 << 20  # two pinned buffers of this size per reader
WORKERS = int(os.environ.get("TURBO_FASTLOAD_WORKERS", "4"))  # most readers of one file (H200 host: 4 and 8 alike)
log = logging.getLogger(__name__)


def read_header(path) -> tuple[int, dict]:
    """(offset of the data region, {name: (dtype, shape, begin, end)}) of a safetensors file, with
    every entry checked against the file's size; ValueError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes): truncated or not "
                             f"a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    base, data = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r}: bad header entry {info!r} (dtype must be one of "
                             f"{sorted(DTYPES)})") from None
        numel = 1
        for s in shape:
            numel *= s
        if not (0 <= begin <= end <= data) or end - begin != numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r}: bytes [{begin}, {end}) do not match its shape {shape} "
                             f"x {dtype} within the {data}-byte data region: truncated or damaged file")
        entries[name] = (dtype, shape, begin, end)
    return base, entries


def _mapped(path, device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_safetensors(path, device="cpu", *, staged: bool | None = None,
                     chunk_bytes: int = CHUNK_BYTES, workers: int | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on `device` (see the module docstring).

    staged: None = the staged read on CUDA, the mapping elsewhere; True/False forces one.
    chunk_bytes: size of each of the two host buffers of the staged read (per reader).
    workers: readers of the staged read, each on its own contiguous share of the data with its own file
    handle and buffers (the reads release the GIL, so copying out of the page cache runs on several
    cores); None = one per GiB of data, at most WORKERS (umT5-XXL's 10.6 GiB: 4; a 1.3 GiB DiT: 1)."""
    path, device = Path(path), torch.device(device)
    base, entries = read_header(path)  # checked before anything is read
    if staged is None:
        staged = device.type == "cuda"
    if not staged:
        return _mapped(path, device)
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    t = time.perf_counter()
    out = {name: torch.empty(shape, dtype=dtype, device=device) for name, (dtype, shape, _, _) in entries.items()}
    # destination byte views, in file order
    spans = sorted(((begin, end, out[name].view(-1).view(torch.uint8)) for name, (_, _, begin, end) in entries.items()
                    if end > begin), key=lambda s: s[0])
    if not spans:
        return out
    lo, hi = spans[0][0], max(end for _, end, _ in spans)
    pin = device.type == "cuda" and torch.cuda.is_available()
    if workers is None:
        workers = min(WORKERS, max(1, (hi - lo) >> 30))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    share = -(-(hi - lo) // workers)
    ranges = [(a, min(a + share, hi)) for a in range(lo, hi, share)]

    # the destinations were allocated on the current stream: the readers' streams start after it
    ready = torch.cuda.Event() if pin else None
    if pin:
        ready.record(torch.cuda.current_stream(device))

    def read(start: int, end: int) -> None:  # one reader: its own file handle, buffers, CUDA stream and events
        buffers = [torch.empty(min(chunk_bytes, end - start), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        done: list = [None, None]  # per buffer: the CUDA event after its last copies (None: free)
        # own stream: copies of loads running side by side (umT5 prefetch, DiT) do not queue behind each other
        stream = torch.cuda.Stream(device) if pin else None
        with (torch.cuda.device(device) if pin else nullcontext()), (torch.cuda.stream(stream) if pin else nullcontext()), \
                open(path, "rb", buffering=0) as f:
            if pin:
                stream.wait_event(ready)
            _stream_chunks(f, path, base, start, end, chunk_bytes, spans, buffers, done, pin)
            if pin:
                for e in done:
                    if e is not None:
                        e.synchronize()  # this reader's bytes have landed: usable on any stream

    try:
        if len(ranges) == 1:
            read(*ranges[0])
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(ranges), thread_name_prefix="fastload") as pool:
                for fut in [pool.submit(read, a, b) for a, b in ranges]:
                    fut.result()  # re-raises a reader's error (ValueError for a short file)
    except RuntimeError as e:  # e.g. no pinned memory to be had: the mapped path still works
        log.warning("%s: staged read failed (%s); reading it through safe_open instead", path, e)
        return _mapped(path, device)
    dt = time.perf_counter() - t
    log.info("%s: %.2f GiB staged onto %s in %.2f s (%.2f GiB/s)", path.name, (hi - lo) / 2**30, device, dt,
             (hi - lo) / 2**30 / max(dt, 1e-9))
    return out


def read_files(files, device, *, staged: bool | None = None) -> dict[str, torch.Tensor]:
    """The tensors of several safetensors files (e.g. a model's shards) on `device`, one dict."""
    state = {}
    for f in files:
        state.update(load_safetensors(f, device, staged=staged))
    return state


def fill_meta_model(model: torch.nn.Module, files, device, dtype: torch.dtype | None = None, *,
                    staged: bool | None = None, tensors: dict | None = None) -> tuple[list[str], list[str]]:
    """Load the tensors of safetensors `files` into a model built on the meta device, in place
    (`load_state_dict(assign=True)`: the tensors become the parameters, no copy), floating-point ones
    cast to `dtype` on `device`. Returns load_state_dict's (missing, unexpected) keys; `meta_tensors`
    lists what is still unloaded (e.g. a tied weight the file stores once).
    tensors: those files' tensors already read onto `device` (`read_files`, e.g. ahead of time in a
    thread while other parts load), used instead of reading them here."""
    return assign_state(model, tensors if tensors is not None else read_files(files, device, staged=staged), dtype)


def assign_state(model: torch.nn.Module, state: dict, dtype: torch.dtype | None = None) -> tuple[list[str], list[str]]:
    """`state` into a model built on the meta device, in place (`load_state_dict(strict=False, assign=True)`:
    the tensors become the parameters, no copy), floating-point ones cast to `dtype` (None: as they are).
    Returns the (missing, unexpected) keys; a shape that differs raises load_state_dict's RuntimeError."""
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() and v.dtype != dtype else v
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    return list(missing), list(unexpected)


def staged_or_none(what, load):
    """`load()` (a staged GPU load that returns a model or None), or None when it fails with a
    RuntimeError, ValueError or OSError: logged, and the caller reads the same files its usual way."""
    try:
        return load()
    except (RuntimeError, ValueError, OSError) as e:
        log.warning("%s: staged GPU load failed (%s); using from_pretrained", what, e)
        return None


def meta_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of `model` still on the meta device."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def _stream_chunks(f, path, base, lo, hi, chunk_bytes, spans, buffers, done, pin) -> None:
    """Read data bytes [lo, hi) chunk by chunk into alternating host buffers and copy each chunk's
    share of every destination span (begin, end, uint8 view) out of it (async from pinned memory)."""
    f.seek(base + lo)
    i = 0  # first span that may still overlap the current chunk
    for k, start in enumerate(range(lo, hi, chunk_bytes)):
        slot = k % 2
        if done[slot] is not None:
            done[slot].synchronize()  # the GPU has taken this buffer's previous bytes
        n = min(chunk_bytes, hi - start)
        buf = buffers[slot][:n]
        view, got = memoryview(buf.numpy()), 0
        while got < n:  # a raw read may return fewer bytes than asked
            r = f.readinto(view[got:])
            if not r:
                raise ValueError(f"{path}: file ended while reading tensor data (offset {base + start + got})")
            got += r
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < start + n:
            begin, end, dst = spans[j]
            a, b = max(begin, start), min(end, start + n)
            dst[a - begin:b - begin].copy_(buf[a - start:b - start], non_blocking=pin)
            j += 1
        if pin:
            done[slot] = torch.cuda.Event()
            done[slot].record(torch.cuda.current_stream())


__all__ = ["CHUNK_BYTES", "DTYPES", "WORKERS", "assign_state", "fill_meta_model", "load_safetensors", "meta_tensors", "read_files",
           "read_header", "staged_or_none"]
