"""turbo_infer.models.umt5 (the runtime's own umT5 encoder) against transformers' UMT5EncoderModel, the
oracle, at tiny random configs: same weights file, same states."""
import json

import pytest
import torch

from turbo_infer.models.umt5 import UMT5Config, UMT5Encoder, relative_position_buckets

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, **cfg):
    torch.manual_seed(0)
    config = transformers.UMT5Config(**{"vocab_size": 50, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2,
                                        "num_heads": 4, "relative_attention_num_buckets": 32,
                                        "relative_attention_max_distance": 16, **cfg})
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():  # the default init leaves the relative bias tiny: make it matter
        for block in model.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_matches_transformers_with_padding_and_far_positions(tmp_path, ffn):
    """Lengths past max_distance (all bucket kinds), two prompts of different lengths (the mask), fp32:
    agreement to float rounding."""
    from safetensors.torch import load_file

    ref = hf_model(tmp_path, feed_forward_proj=ffn)
    cfg = UMT5Config.from_json(tmp_path / "config.json")
    assert cfg.feed_forward_proj == ffn and cfg.relative_attention_max_distance == 16
    ours = UMT5Encoder.from_state(cfg, load_file(str(tmp_path / "model.safetensors")), "model.safetensors")
    ids = torch.randint(2, 50, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 23:] = 0
    ids[1, 23:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask).last_hidden_state
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :23], want[1, :23], atol=1e-5, rtol=1e-5)  # past the prompt: zeroed later


def test_bf16_close_to_fp32_and_tied_embedding_key(tmp_path):
    """bf16 weights (the runtime's dtype) stay within bf16 rounding of fp32; a file that stores only
    encoder.embed_tokens.weight (tied to shared) loads as shared."""
    from safetensors.torch import load_file

    hf_model(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    cfg = UMT5Config.from_json(tmp_path / "config.json")
    fp32 = UMT5Encoder.from_state(cfg, state)
    embed = state.pop("shared.weight", None)
    if embed is not None:
        state["encoder.embed_tokens.weight"] = embed
    bf16 = UMT5Encoder.from_state(cfg, {k: v.bfloat16() for k, v in state.items()})
    ids = torch.randint(2, 50, (1, 12))
    with torch.no_grad():
        a, b = fp32(ids).last_hidden_state, bf16(ids).last_hidden_state.float()
    assert ((a - b).norm() / a.norm()).item() < 3e-2  # bf16 weights and activations: ~1e-2


def test_bucket_table_edges():
    b = relative_position_buckets(300, 32, 128)
    assert b[0, 0] == 0 and b[0, 1] == 17 and b[1, 0] == 1  # same position; one right (upper half); one left
    assert b[0, 7] == 16 + 7 and b[0, 8] >= 16 + 8  # exact below 8, logarithmic from 8
    assert b[0, 299] == 31 and b[299, 0] == 15  # beyond max_distance: the last bucket of each half
    assert int(b.min()) == 0 and int(b.max()) == 31


def test_bad_configs_and_state_are_named(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"d_model": 0}))
    with pytest.raises(ValueError, match="config.json.*d_model"):
        UMT5Config.from_json(bad)
    bad.write_text(json.dumps({"feed_forward_proj": "gated-swish"}))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        UMT5Config.from_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable config"):
        UMT5Config.from_json(bad)
    cfg = UMT5Config(vocab_size=10, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="weights.safetensors: does not match"):
        UMT5Encoder.from_state(cfg, {"shared.weight": torch.zeros(10, 8)}, "weights.safetensors")
