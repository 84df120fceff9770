"""Video files: write mp4 (H.264) and gif through imageio-ffmpeg's ffmpeg, read them back.

Frames are uint8 (F, H, W, 3) RGB, a torch tensor or a numpy array. Writes are atomic: the file is
written under a temporary name in the target directory and renamed into place, so a crash never
leaves a truncated video at `path`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def _as_frames(video) -> np.ndarray:
    """Validate a (F, H, W, 3) uint8 video and return it as a contiguous numpy array."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if not isinstance(video, np.ndarray):
        raise TypeError(f"video must be a torch.Tensor or numpy array, got {type(video).__name__}")
    if video.dtype != np.uint8:
        raise TypeError(f"video must be uint8, got {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[:3]) < 1:
        raise ValueError(f"video must have shape (F, H, W, 3) with F, H, W >= 1, got {video.shape}")
    return np.ascontiguousarray(video)


def _check_fps(fps) -> float:
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    return float(fps)


def _tmp_path(path: Path) -> Path:
    # same directory (rename stays on one filesystem) and same suffix (ffmpeg picks the muxer by it)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_mp4(path, video, fps: float = 8) -> Path:
    """Write `video` (F, H, W, 3) uint8 as H.264 mp4 (yuv420p). yuv420p needs even sizes: odd
    heights/widths are padded by one replicated edge row/column (never rescaled). Returns the path."""
    return write_mp4_stream(path, [_as_frames(video)], fps)


def write_gif(path, video, fps: float = 8) -> Path:
    """Write `video` (F, H, W, 3) uint8 as a looping gif through ffmpeg (one 256-color palette for
    the whole clip from palettegen, no dithering: lossy for clips with more colors). Every frame is
    kept (Pillow's writer would merge identical consecutive frames)."""
    frames = _as_frames(video)
    fps = _check_fps(fps)
    path = Path(path)
    palette = "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=none"
    return _write_through_ffmpeg(path, frames, fps, codec="gif", pix_fmt_out="pal8", quality=None,
                                 output_params=["-filter_complex", palette, "-loop", "0"])


def _write_through_ffmpeg(path: Path, frames: np.ndarray, fps: float, **writer_kw) -> Path:
    """Pipe frames (F, H, W, 3) into imageio-ffmpeg's writer at a temporary name, then rename to path."""
    import imageio_ffmpeg

    F, H, W, _ = frames.shape
    tmp = _tmp_path(path)
    try:
        writer = imageio_ffmpeg.write_frames(str(tmp), size=(W, H), fps=fps, macro_block_size=1, **writer_kw)
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(frame)
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class _FfmpegSink:
    """H.264 mp4 through imageio-ffmpeg, as write_mp4 (odd sizes padded by one replicated edge)."""

    def __init__(self, tmp: Path, width: int, height: int, fps: float):
        import imageio_ffmpeg

        self.pad_h, self.pad_w = height % 2, width % 2
        self.writer = imageio_ffmpeg.write_frames(str(tmp), size=(width + self.pad_w, height + self.pad_h), fps=fps,
                                                  macro_block_size=1, codec="libx264", pix_fmt_out="yuv420p",
                                                  quality=8, output_params=["-movflags", "+faststart"])
        self.writer.send(None)  # start ffmpeg

    def write(self, frame: np.ndarray) -> None:
        if self.pad_h or self.pad_w:
            frame = np.pad(frame, ((0, self.pad_h), (0, self.pad_w), (0, 0)), mode="edge")
        self.writer.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        self.writer.close()


def write_mp4_stream(path, chunks, fps: float = 8, sink=None) -> Path:
    """Write an mp4 from `chunks`, an iterable of (f, H, W, 3) uint8 frame blocks (tensors or arrays; e.g.
    a VAE decoding one latent frame at a time), encoding each block in a writer thread while the next is
    made, so the file is done soon after the last block instead of a full encode later. Atomic as
    write_mp4 (a failure in the producer or the encoder leaves nothing at `path`). sink: a factory
    (tmp_path, width, height, fps) -> object with write(frame) and close() (default: H.264 through
    imageio-ffmpeg); blocks must all have the first one's size. Returns the path."""
    import queue
    import threading

    fps, path = _check_fps(fps), Path(path)
    sink = sink or _FfmpegSink
    tmp = _tmp_path(path)
    blocks: queue.Queue = queue.Queue(maxsize=4)
    failed: list[BaseException] = []
    stop = object()

    def encode() -> None:
        out, ended = None, False
        try:
            while not ended:
                block = blocks.get()
                if block is stop:
                    ended = True
                    break
                if out is None:
                    out = sink(tmp, block.shape[2], block.shape[1], fps)
                for frame in block:
                    out.write(frame)
            if out is None:
                raise ValueError(f"{path}: no frames to write")
            out.close()
        except BaseException as e:  # reported by the producer's thread
            failed.append(e)
            if out is not None:
                try:
                    out.close()  # stop the encoder (its file is discarded)
                except Exception:
                    pass
            while not ended:  # drain, so the producer never blocks on a full queue
                ended = blocks.get() is stop

    writer = threading.Thread(target=encode, name="mp4 writer", daemon=True)
    writer.start()
    size = None
    try:
        try:
            for chunk in chunks:
                block = _as_frames(chunk)
                if size is None:
                    size = block.shape[1:]
                elif block.shape[1:] != size:
                    raise ValueError(f"{path}: frame block of size {block.shape[1:3]} after {size[:2]}")
                if failed:
                    break
                blocks.put(block)
        finally:
            blocks.put(stop)
            writer.join()
        if failed:
            raise failed[0]
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_video(path, video, fps: float = 8) -> Path:
    """Write mp4 or gif chosen by the suffix of `path`."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return write_mp4(path, video, fps)
    if suffix == ".gif":
        return write_gif(path, video, fps)
    raise ValueError(f"path {str(path)!r}: unsupported video suffix {suffix!r} (use .mp4 or .gif)")


def read_video(path) -> np.ndarray:
    """Read an mp4 or gif back as a (F, H, W, 3) uint8 numpy array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    W, H = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(H, W, 3) for buf in reader]
    return np.stack(frames)
