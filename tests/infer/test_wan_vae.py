"""turbo_infer.models.wan_vae (the runtime's own Wan2.1 VAE decoder) against diffusers' AutoencoderKLWan,
the oracle, at tiny random configs: same file, same video."""
import json

import pytest
import torch

from turbo_infer.models.wan_vae import WanVAEDecoder

diffusers = pytest.importorskip("diffusers")


def save_vae(path, **cfg):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(**{"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                                        "attn_scales": [], "temperal_downsample": [False, True, True], **cfg}).eval()
    with torch.no_grad():  # RMS-norm gains and the attention away from their identity init
        for n, p in vae.named_parameters():
            if n.endswith("gamma"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    vae.save_pretrained(path)
    return vae


@pytest.mark.parametrize("cfg,frames", [({}, 4), ({"temperal_downsample": [True, False, True]}, 3),
                                        ({"dim_mult": [1, 2, 4], "temperal_downsample": [True, True],
                                          "num_res_blocks": 2}, 3)])
def test_decode_matches_diffusers(tmp_path, cfg, frames):
    """Several latent frames (the per-frame caches of every causal conv and both temporal upsamplers'
    first-frame rule), fp32: agreement to float rounding."""
    ref = save_vae(tmp_path, **cfg)
    ours = WanVAEDecoder.from_dir(tmp_path, "cpu", torch.float32)
    z = torch.randn(1, 4, frames, 4, 6)
    with torch.no_grad():
        want = ref.decode(z, return_dict=False)[0]
    got = ours.decode(z)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # streamed: one block per latent frame (the first frame alone), together the same video
    chunks = list(ours.decode_chunks(z))
    assert len(chunks) == frames and chunks[0].shape[2] == 1
    torch.testing.assert_close(torch.cat(chunks, dim=2), got, atol=0, rtol=0)


def test_bf16_and_prefetched_tensors(tmp_path):
    from safetensors.torch import load_file

    ref = save_vae(tmp_path)
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        want = ref.decode(z, return_dict=False)[0]
    tensors = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    bf16 = WanVAEDecoder.from_dir(tmp_path, "cpu", torch.bfloat16, tensors=tensors)
    got = bf16.decode(z.bfloat16()).float()
    assert ((got - want).norm() / want.norm()).item() < 3e-2  # bf16 through ~25 layers


def test_refuses_what_it_does_not_reproduce(tmp_path):
    save_vae(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in (("is_residual", True), ("patch_size", 2)):
        bad = dict(cfg, **{key: value})
        with pytest.raises(ValueError, match=f"field '{key}'"):
            WanVAEDecoder.check_config(bad)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "z_dim"}))
    with pytest.raises(ValueError, match="'z_dim' missing"):
        WanVAEDecoder.from_dir(tmp_path, "cpu", torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, z_dim=8)))
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors: does not match"):
        WanVAEDecoder.from_dir(tmp_path, "cpu", torch.float32)
