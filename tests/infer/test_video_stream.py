"""turbo_infer.video_io.write_mp4_stream and TurboPipeline.generate_mp4: frames encoded while they are
made, the file written atomically whatever fails."""
import numpy as np
import pytest
import torch

from turbo_infer.video_io import read_video, write_mp4_stream

pytest.importorskip("imageio_ffmpeg")


def _blocks(sizes, h=16, w=24):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(n, h, w, 3), dtype=np.uint8) for n in sizes]


def test_stream_writes_every_frame_of_every_block(tmp_path):
    blocks = _blocks([1, 4, 4])
    out = write_mp4_stream(tmp_path / "a.mp4", iter(blocks), fps=8)
    back = read_video(out)
    assert back.shape == (9, 16, 24, 3)
    # lossy H.264: the decoded frames are close to what went in (mean error of a few levels of 255 on
    # smooth content; random pixels are the worst case for the codec, so only a loose bound holds)
    assert np.abs(back.astype(float) - np.concatenate(blocks).astype(float)).mean() < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # no temporary file left


def test_odd_sizes_and_torch_blocks(tmp_path):
    blocks = [torch.from_numpy(b) for b in _blocks([2, 3], h=15, w=17)]
    assert read_video(write_mp4_stream(tmp_path / "odd.mp4", blocks, fps=4)).shape == (5, 16, 18, 3)


class _Sink:
    frames: list = []

    def __init__(self, tmp, width, height, fps, fail_at=None):
        self.tmp, self.fail_at = tmp, fail_at
        tmp.write_bytes(b"partial")
        _Sink.frames = []

    def write(self, frame):
        if self.fail_at is not None and len(_Sink.frames) == self.fail_at:
            raise RuntimeError("encoder died")
        _Sink.frames.append(frame.copy())

    def close(self):
        self.tmp.write_bytes(b"done")


def test_failures_leave_nothing_at_the_path(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"the old video")

    def producer():
        yield from _blocks([1, 4])
        raise ValueError("the VAE ran out of memory")

    with pytest.raises(ValueError, match="out of memory"):
        write_mp4_stream(path, producer(), sink=_Sink)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4_stream(path, _blocks([1, 4, 4, 4]), sink=lambda *a: _Sink(*a, fail_at=3))
    with pytest.raises(ValueError, match="no frames"):
        write_mp4_stream(path, [], sink=_Sink)
    with pytest.raises(ValueError, match="frame block of size"):
        write_mp4_stream(path, [_blocks([1])[0], _blocks([1], h=8)[0]], sink=_Sink)
    with pytest.raises(ValueError, match="shape"):
        write_mp4_stream(path, [np.zeros((2, 8, 8), np.uint8)], sink=_Sink)
    assert path.read_bytes() == b"the old video" and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    # a custom sink gets every frame in order, and the rename happens after its close
    blocks = _blocks([1, 4])
    write_mp4_stream(path, blocks, sink=_Sink)
    assert path.read_bytes() == b"done" and len(_Sink.frames) == 5
    np.testing.assert_array_equal(np.stack(_Sink.frames), np.concatenate(blocks))


def test_pipeline_generate_mp4_matches_generate(tmp_path):
    """The toy pipeline: the streamed file holds the frames generate() returns (same seed)."""
    from turbo_infer.pipeline import TurboPipeline

    pipe = TurboPipeline.toy(device="cpu")
    kw = dict(steps=2, seed=3, num_frames=4, height=32, width=32, progress=False)
    video = pipe.generate(["a red circle moves left"], **kw)[0]
    frames = []

    class Keep(_Sink):
        def write(self, frame):
            frames.append(frame.copy())

    pipe.generate_mp4("a red circle moves left", tmp_path / "t.mp4", sink=Keep, **kw)
    np.testing.assert_array_equal(np.stack(frames), video.numpy())
    with pytest.raises(TypeError, match="one string"):
        pipe.generate_mp4(["a", "b"], tmp_path / "x.mp4")
