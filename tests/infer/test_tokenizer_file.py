"""FileTokenizer (tokenizer.json through `tokenizers`) against transformers' AutoTokenizer on the same
directory, for the whitespace-cleaned prompts the text encoders pass; the umT5 text encoder's own path
against a transformers one."""
import json
import sys
from pathlib import Path

import pytest
import torch

from turbo_infer.text_encoders import clean_prompt
from turbo_infer.tokenizer_file import FileTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle", "  two   green\ttriangles  ", "", "Ünïcödé ｆｕｌｌ width 色调艳丽，过曝", "a" * 50,
           "the cat sat on the mat " * 20, "<pad> </s> hi"]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """The test umT5 tokenizer's kind (a trained 60-piece unigram) and bench_e2e's synthetic one."""
    from e2e_setup import synthetic_umt5_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = ["a red circle moving left", "a blue square over grass", "the cat sat on the mat"]
    tk.train_from_iterator(corpus * 10, trainers.UnigramTrainer(vocab_size=40, special_tokens=["<pad>", "</s>", "<unk>"],
                                                                unk_token="<unk>"))
    vocab = [(p, s) for p, s in json.loads(tk.to_str())["model"]["vocab"]]
    a, b = tmp_path_factory.mktemp("trained"), tmp_path_factory.mktemp("synthetic")
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(a)
    synthetic_umt5_tokenizer(1000).save_pretrained(b)
    return a, b


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("max_length", [6, 64])
def test_same_ids_as_transformers_on_cleaned_prompts(tok_dirs, which, max_length):
    d = tok_dirs[which]
    hf, ours = transformers.AutoTokenizer.from_pretrained(str(d)), FileTokenizer(d / "tokenizer.json")
    prompts = [clean_prompt(p) for p in PROMPTS]
    kw = dict(padding="max_length", truncation=True, max_length=max_length, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    a, b = hf(prompts, **kw), ours(prompts, **kw)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    for p in prompts:  # one string, no padding: flat lists, </s> at the end
        assert ours(p)["input_ids"] == hf(p)["input_ids"] and ours(p)["input_ids"][-1] == ours._tok.token_to_id("</s>")


def test_errors_name_the_file(tmp_path, tok_dirs):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json: unreadable tokenizer file"):
        FileTokenizer(bad)
    j = json.loads((tok_dirs[0] / "tokenizer.json").read_text())
    bad.write_text(json.dumps(j))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<nothing>"}))
    with pytest.raises(ValueError, match="pad token '<nothing>' is not in the vocabulary"):
        FileTokenizer(bad)
    tok = FileTokenizer(tok_dirs[0] / "tokenizer.json")
    with pytest.raises(ValueError, match="need max_length"):
        tok(["a"], padding="max_length")
    with pytest.raises(ValueError, match="padding"):
        tok(["a"], padding="longest", max_length=4)


def test_umt5_text_encoder_own_path_equals_transformers(tmp_path, monkeypatch, caplog):
    """UMT5TextEncoder on a directory with tokenizer.json + safetensors runs the runtime's own encoder and
    tokenizer (`native`) and encodes what transformers' UMT5EncoderModel + AutoTokenizer encode; weights
    the own encoder refuses (T5's layout: one relative bias) are logged and go through transformers."""
    from e2e_setup import synthetic_umt5_tokenizer

    from turbo_infer.text_encoders import UMT5TextEncoder, _HFTextEncoder

    torch.manual_seed(0)
    cfg = transformers.UMT5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                  pad_token_id=0, eos_token_id=1)
    model = transformers.UMT5EncoderModel(cfg).eval()
    model.save_pretrained(tmp_path)
    synthetic_umt5_tokenizer(1000).save_pretrained(tmp_path)
    prompts = ["a red circle over the grass", "two   stars", "色调艳丽"]
    ref = _HFTextEncoder(model, transformers.AutoTokenizer.from_pretrained(str(tmp_path)), device="cpu",
                         dtype=torch.float32, max_length=16, negative_prompt="", cache_size=0, cache_dir=None,
                         namespace="ref").encode(prompts)
    enc = UMT5TextEncoder(tmp_path, max_length=16, cache_size=0)
    assert enc.native and type(enc.tokenizer) is FileTokenizer
    torch.testing.assert_close(enc.encode(prompts), ref, atol=1e-5, rtol=1e-5)
    import turbo_infer.text_encoders as te
    from safetensors.torch import load_file, save_file

    t5_like = tmp_path / "t5_like"
    t5_like.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (t5_like / f).write_bytes((tmp_path / f).read_bytes())
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    save_file(sd, str(t5_like / "model.safetensors"))
    with caplog.at_level("WARNING", logger="turbo_infer.text_encoders"):
        assert te._native_umt5(t5_like, t5_like, "cpu", torch.float32) is None
    assert "not read by the runtime's own encoder" in caplog.text and "relative_attention_bias" in caplog.text
    monkeypatch.setattr(te, "_native_umt5", lambda *a, **k: None)  # the transformers path, same directory
    fallback = UMT5TextEncoder(tmp_path, max_length=16, cache_size=0)
    assert not fallback.native
    torch.testing.assert_close(fallback.encode(prompts), ref, atol=1e-5, rtol=1e-5)
