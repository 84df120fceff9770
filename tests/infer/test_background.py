"""Background loading (turbo_infer.background) and TurboPipeline.from_bundle(background=True): the text
encoder and VAE load in threads while the DiT loads; results identical to the sequential path; a load
error surfaces, with its own type and message, where the component is first needed."""
import threading

import pytest
import torch

from turbo_infer.background import Background
from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.models.wan_keys import save_wan_checkpoint
from turbo_infer.pipeline import TurboPipeline

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=384, in_channels=48, out_channels=48)

pytestmark = pytest.mark.usefixtures("one_thread")


class Thing:
    dim = 7

    def hello(self):
        return "hi"


def test_background_promises_delegates_and_reraises():
    gate = threading.Event()

    def slow():
        gate.wait(5)
        return Thing()

    b = Background("thing", slow, dim=7)
    assert b.dim == 7 and not b.ready  # answered before the object exists
    gate.set()
    assert b.hello() == "hi" and b.ready and isinstance(b.result(), Thing)

    def broken():
        raise FileNotFoundError("umT5 text encoder directory not found: /nowhere")

    b = Background("text encoder", broken, dim=7)
    b._done.wait(5)
    assert b.dim == 7  # a promised attribute never waits or raises: the error comes on use
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        b.encode(["x"])
    assert "failed" in repr(b)
    with pytest.raises(ValueError, match="dim is 7, but 9 was promised"):
        Background("thing", Thing, dim=9).result()
    with pytest.raises(AttributeError):
        Background("thing", Thing)._private  # noqa: B018 - private names never trigger a load wait


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory):
    from turbo_train.export import export_bundle

    root = tmp_path_factory.mktemp("bg")
    torch.manual_seed(0)
    model = WanModel(TINY).eval()
    for p in model.parameters():  # Wan's init zeroes the head: give every weight some signal
        torch.nn.init.normal_(p, std=0.05)
    save_wan_checkpoint(model, root / "tiny.safetensors")
    return export_bundle(root / "tiny.safetensors", "cpu", root / "out", steps=2, progress=False)


def test_from_bundle_in_the_background_makes_the_same_video(cpu_bundle):
    seq = TurboPipeline.from_bundle(cpu_bundle, "cpu")
    bg = TurboPipeline.from_bundle(cpu_bundle, "cpu", background=True)
    assert isinstance(bg.text_encoder, Background) and isinstance(bg.vae, Background)
    kw = dict(num_frames=8, height=64, width=64, seed=3, progress=False)
    assert torch.equal(seq.generate(["a red circle moving left"], **kw), bg.generate(["a red circle moving left"], **kw))


def test_a_background_load_error_surfaces_on_use_and_a_refusal_comes_first(cpu_bundle, tmp_path, monkeypatch):
    pipe = TurboPipeline.from_bundle(cpu_bundle, "cpu", background=True, text_encoder_path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pipe.generate(["a red circle"], num_frames=8, height=64, width=64, progress=False)
    # an h100 target refused on this CPU before any thread starts
    from turbo_infer import bundle as B
    from turbo_train.export import export_bundle

    h100 = export_bundle(cpu_bundle.parent.parent / "tiny.safetensors", "h100", tmp_path / "out", steps=2,
                         progress=False)
    started = []
    monkeypatch.setattr("turbo_infer.background.Background.__init__", lambda *a, **k: started.append(1))
    with pytest.raises(B.BundleError, match="h100"):
        TurboPipeline.from_bundle(h100, "cpu", background=True)
    assert not started
