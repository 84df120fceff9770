"""A tokenizer.json run by the `tokenizers` library, answering the call the text encoders make.

The runtime's umT5 path avoids importing transformers (seconds of the time to first video). It also
tokenizes with the file's own pipeline (normalizer, pre-tokenizer, post-processor), as transformers 4's
fast tokenizers and the Wan reference code did; transformers 5's T5Tokenizer instead rebuilds its own
pipeline from the vocabulary (whitespace split + Metaspace, and the file's normalizer only when its
`_spm_precompiled_charsmap` comes along). The two agree on whitespace-cleaned prompts, which is what the
text encoders pass (`clean_prompt`); tests/infer/test_tokenizer_file.py checks that agreement.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class FileTokenizer:
    """`tokenizer.json` (+ the pad token from a sibling tokenizer_config.json, default "<pad>")."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            raise ValueError(f"{path}: unreadable tokenizer file ({e})") from None
        pad = "<pad>"
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("pad_token", pad)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config}: unreadable ({e})") from None
            pad = value.get("content", pad) if isinstance(value, dict) else (value or pad)
        self.pad_token = pad
        self.pad_token_id = self._tok.token_to_id(pad)
        if self.pad_token_id is None:
            raise ValueError(f"{path}: the pad token {pad!r} is not in the vocabulary")
        self.path = path

    def __call__(self, prompts, *, padding=False, truncation=False, max_length: int | None = None,
                 add_special_tokens=True, return_attention_mask=True, return_tensors=None) -> dict:
        """{"input_ids", "attention_mask"} as transformers' tokenizers answer: for a list of prompts, lists
        (or with return_tensors="pt" (B, L) long tensors); for one string, flat lists. The file's special
        tokens are added (T5: </s>); truncation cuts to max_length, padding="max_length" pads to it."""
        if padding not in (False, "max_length") or return_tensors not in (None, "pt"):
            raise ValueError(f"FileTokenizer supports padding False/'max_length' and return_tensors None/'pt', "
                             f"got {padding!r}, {return_tensors!r}")
        if (padding or truncation) and max_length is None:
            raise ValueError("padding='max_length' and truncation need max_length")
        single = isinstance(prompts, str)
        if truncation:
            self._tok.enable_truncation(max_length)
        else:
            self._tok.no_truncation()
        if padding:
            self._tok.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        else:
            self._tok.no_padding()
        enc = self._tok.encode_batch([prompts] if single else list(prompts), add_special_tokens=add_special_tokens)
        ids, mask = [e.ids for e in enc], [e.attention_mask for e in enc]
        if return_tensors == "pt":
            ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        elif single:
            ids, mask = ids[0], mask[0]
        out = {"input_ids": ids}
        if return_attention_mask:
            out["attention_mask"] = mask
        return out


__all__ = ["FileTokenizer"]
