"""Train a small byte-level BPE tokenizer that holds the Qwen special tokens, saved as a checkpoint would be.

Used by the bundled model and by the tests' tiny checkpoints: both need a real `tokenizer.json` whose
special tokens sit at the ids their `config.json` names, exactly as a downloaded Qwen checkpoint has them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The Qwen2-VL special tokens, in the order the real vocabulary appends them after the BPE merges.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen's pre-tokenisation split (letters, digits one at a time, punctuation runs, whitespace).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "assets" / "chat_templates"


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """BPE over bytes; `vocab_size` counts the BPE tokens only, the specials come after them."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, chat_template: str) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja; return the special ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = special_token_ids(tok)
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return ids


def default_chat_template(family: str) -> str:
    """The chat template of the family's real checkpoints (Qwen2-VL's serves Qwen2.5-VL too)."""
    name = "qwen3_vl_chat_template.jinja" if family in ("qwen3_vl", "qwen3_vl_moe") else "qwen2_vl_chat_template.jinja"
    return (CHAT_TEMPLATE_DIR / name).read_text(encoding="utf-8")
