"""Tokenizer resolution for preprocessing: a local HF tokenizer folder, or a hub name looked up offline.

Uses the `tokenizers` library directly (no transformers import): preprocessing needs only fast encoding,
the vocabulary size, and the end-of-document and padding ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mtf_train.data.errors import DataError

# Tried in order when the folder's config names no eos token.
_EOD_FALLBACKS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


@dataclass(frozen=True)
class TokenizerInfo:
    spec: str              # what the user gave
    json_path: str         # the tokenizer.json that was loaded
    vocab_size: int        # including added tokens
    eod_id: int
    eod_token: str
    pad_id: int
    pad_token: str


def resolve_tokenizer_dir(spec: str) -> Path:
    """A folder holding tokenizer.json: `spec` itself, or `spec` found in the local Hugging Face cache."""
    p = Path(os.path.expanduser(spec))
    if p.is_file() and p.name == "tokenizer.json":
        return p.parent
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise DataError(str(spec), "no tokenizer.json in this folder (a fast Hugging Face tokenizer is needed)")
        return p
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise DataError(str(spec), "no such tokenizer folder")
    # The cache location is read now, not when huggingface_hub was first imported.
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                               if os.environ.get("HF_HOME") else None)
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(spec, local_files_only=True, cache_dir=cache,
                                   allow_patterns=["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    except Exception:  # any miss or malformed name: we never go online
        raise DataError(str(spec), "not a local folder and not in the Hugging Face cache (looked up offline); "
                        "give a tokenizer folder or download it first") from None
    folder_p = Path(folder)
    if not (folder_p / "tokenizer.json").is_file():
        raise DataError(str(spec), f"cached snapshot {folder} has no tokenizer.json")
    return folder_p


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_tokenizer(spec: str):
    """(tokenizers.Tokenizer, TokenizerInfo). The eod token is the folder's eos token (BLOOM: `</s>`)."""
    from tokenizers import Tokenizer

    folder = resolve_tokenizer_dir(spec)
    json_path = folder / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(json_path))
    except Exception as err:
        raise DataError(str(json_path), f"cannot load tokenizer: {str(err).splitlines()[0]}") from None
    config = _read_json(folder / "tokenizer_config.json")
    special = _read_json(folder / "special_tokens_map.json")

    def pick(key: str, fallbacks: tuple[str, ...]) -> str | None:
        for source in (config, special):
            text = _token_text(source.get(key))
            if text is not None and tok.token_to_id(text) is not None:
                return text
        for text in fallbacks:
            if tok.token_to_id(text) is not None:
                return text
        return None

    eod = pick("eos_token", _EOD_FALLBACKS)
    if eod is None:
        raise DataError(str(folder), "cannot find the end-of-document token (no eos_token in tokenizer_config.json "
                        "and none of " + ", ".join(_EOD_FALLBACKS) + " in the vocabulary)")
    pad = pick("pad_token", ()) or eod
    info = TokenizerInfo(str(spec), str(json_path), tok.get_vocab_size(with_added_tokens=True),
                         tok.token_to_id(eod), eod, tok.token_to_id(pad), pad)
    return tok, info
