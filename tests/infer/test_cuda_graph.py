"""GraphedDiT (turbo_infer.cuda_graph): the CPU / autograd fallbacks and argument checks here; the recording and
replay run on CUDA only (tools/bench_e2e.py times them and checks a replay against the direct forward)."""
import pytest
import torch

from turbo_infer.cuda_graph import GraphedDiT


class Recorder(torch.nn.Module):
    patch_size = (1, 2, 2)

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))
        self.calls = 0

    def forward(self, x, t, context):
        self.calls += 1
        return x * self.w + t.view(-1, 1) + context.sum()


def test_off_cuda_and_under_autograd_it_is_the_model():
    model = Recorder()
    g = GraphedDiT(model)
    x, t, c = torch.ones(2, 3), torch.tensor([1.0, 2.0]), torch.ones(1, 2)
    with torch.no_grad():
        assert torch.equal(g(x, t, c), model(x, t, c))
    out = g(x, t, c)  # grad enabled: the model itself, so gradients reach its weights
    out.sum().backward()
    assert model.w.grad is not None and g.num_graphs == 0
    assert g.patch_size == (1, 2, 2)  # attributes are the model's


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_warmup_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="warmup"):
        GraphedDiT(Recorder(), warmup=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replay_matches_the_model_and_records_once_per_signature():
    model = Recorder().cuda()
    g = GraphedDiT(model)
    with torch.no_grad():
        for scale in (1.0, 3.0):
            x, t, c = (torch.randn(2, 3, device="cuda") * scale, torch.tensor([1.0, 2.0], device="cuda"),
                       torch.randn(1, 2, device="cuda"))
            assert torch.allclose(g(x, t, c), model(x, t, c))
        assert g.num_graphs == 1
        g(torch.randn(4, 3, device="cuda"), torch.zeros(4, device="cuda"), torch.zeros(1, 2, device="cuda"))
        assert g.num_graphs == 2


def test_pipeline_refuses_graphs_for_two_experts(tmp_path):
    """A BoundaryExperts DiT chooses its expert on the host from the timesteps: use_cuda_graphs refuses it with a
    message that says why; a single DiT is wrapped, and enabled=False unwraps."""
    from turbo_infer.models.experts import BoundaryExperts
    from turbo_infer.models.wan import WanConfig, WanModel
    from turbo_infer.pipeline import TurboPipeline

    pipe = TurboPipeline.toy(dtype=torch.float32)
    assert isinstance(pipe.use_cuda_graphs().graphed, GraphedDiT) and pipe.use_cuda_graphs(False).graphed is None
    dit = pipe.transformer
    pipe.transformer = BoundaryExperts(dit, WanModel(WanConfig.from_dict(dit.config.to_dict())), 0.9)
    with pytest.raises(ValueError, match="two experts"):
        pipe.use_cuda_graphs()
