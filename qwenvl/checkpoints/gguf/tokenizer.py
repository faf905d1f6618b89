"""The tokenizer and chat template a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`),
rebuilt as the `tokenizers` BPE that Qwen's own tokenizer.json describes.

What the converter stores (conversion/base.py, `get_vocab_base`): `tokens` by id, the byte-level BPE
alphabet for ordinary tokens ("Ġthe") and the plain text for added ones; `token_type` 1 normal,
3 control (added tokens marked special, or that look special: `<|...|>`), 4 user-defined (other added
tokens such as `<tool_call>`), 5 unused (the [PAD] ids filling the config's vocab_size); `merges` as
"left right" strings; `pre`, the name llama.cpp gives the pre-tokenizer ("qwen2" for every Qwen-VL).
Qwen2's tokenizer.json has an NFC normaliser, its split regex, byte-level mapping and decoder; the same
pieces built here give identical ids (tests/test_gguf.py checks a mixed zh/en/special corpus).

End of generation: the file names one eos id; llama.cpp also ends on the other Qwen turn/text ends it
knows by name (`<|im_end|>`, `<|endoftext|>`), as the Hub's generation_config.json lists both. So do we.
A `<|...|>` token the original marked non-special (Qwen2.5's `<|fim_*|>`) is control here, as in llama.cpp,
so it is dropped when decoding: the only visible difference from the folder's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .files import GGUFError, field

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {"qwen2": QWEN2_SPLIT}
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def token_ids(reader) -> dict[str, int]:
    """{token text: id} of the file's vocabulary (unused padding ids left out)."""
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    types = field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    return {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != UNUSED}


@dataclass(frozen=True)
class GGUFVocabulary:
    """What qwenvl.tokenizer.Tokenizer is made of (Tokenizer.from_gguf), read from a language model GGUF."""
    tokenizer: HFTokenizer
    chat_template: str | None
    eos_token_ids: tuple[int, ...]
    source: str


def gguf_vocabulary(reader, path) -> GGUFVocabulary:
    """The tokenizer pieces of a language model GGUF; a GGUFError names what the file lacks or qwenvl cannot
    build."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}; qwenvl builds the byte-level BPE ('gpt2') "
                        "tokenizer every Qwen-VL model uses")
    pre = field(reader, "tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not one qwenvl knows ({', '.join(_PRE_TOKENIZERS)})")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    if not tokens or types is None or merges is None or len(types) != len(tokens):
        raise GGUFError(f"{path}: the vocabulary (tokenizer.ggml.tokens / token_type / merges) is missing or "
                        "inconsistent")
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != UNUSED}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                     byte_fallback=False, ignore_merges=False)
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Added tokens in id order: each is matched whole in the text before BPE, as in the original.
    tok.add_tokens([AddedToken(t, special=k == CONTROL, normalized=False)
                    for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)])
    template = field(reader, "tokenizer.chat_template")
    return GGUFVocabulary(tok, template, _eos_ids(reader, vocab, types), str(path))


def _eos_ids(reader, vocab: dict[str, int], types) -> tuple[int, ...]:
    eos = [field(reader, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    eos += [vocab[t] for t in _END_TOKENS if t in vocab and types[vocab[t]] == CONTROL]
    return tuple(dict.fromkeys(int(i) for i in eos if i is not None))
