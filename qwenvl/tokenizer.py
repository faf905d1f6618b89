"""The checkpoint's own tokenizer and chat template, without transformers.

`tokenizers` reads `tokenizer.json`; the chat template is rendered with jinja2 in the same sandboxed
environment transformers uses (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, a `tojson` that
does not HTML-escape), so the prompt text is identical to `apply_chat_template`'s.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .inputs.errors import InputError

# Special tokens that carry meaning in the answer: grounding output must survive decoding.
GROUNDING_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                    "<|quad_start|>", "<|quad_end|>")


class TokenizerError(ValueError):
    """A tokenizer folder we cannot load; the message names the file."""


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, chat_template: str | None, eos_token_ids: tuple[int, ...],
                 source: str = "tokenizer"):
        self._tok = tok
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.source = source
        added = tok.get_added_tokens_decoder()           # {id: AddedToken}
        self.special_ids = {t.content: i for i, t in added.items() if t.special}
        keep = {self.special_ids.get(t) for t in GROUNDING_TOKENS}
        # Every special token except the grounding markers is dropped on decode: eos, pad, turn markers,
        # vision tokens. Non-special added tokens (<tool_call>, <think>) are text and stay.
        self._drop = frozenset(i for i in self.special_ids.values() if i not in keep)
        self._template = _compile(chat_template) if chat_template else None

    # A compiled jinja template does not pickle; the source does. Engine replicas (`serve --replicas`) send
    # their tokenizer to the HTTP front in EngineInfo, so it crosses a process boundary.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_template"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._template = _compile(self.chat_template) if self.chat_template else None

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: not found; a checkpoint folder must hold tokenizer.json")
        tok = _HFTokenizer.from_file(str(path))
        cfg = _read_json(d / "tokenizer_config.json")
        template = _find_chat_template(d, cfg)
        eos: list[int] = []
        gen = _read_json(d / "generation_config.json").get("eos_token_id")
        for i in (gen if isinstance(gen, list) else [gen] if gen is not None else []):
            if int(i) not in eos:
                eos.append(int(i))
        name = cfg.get("eos_token")
        name = name.get("content") if isinstance(name, dict) else name
        if name:
            i = tok.token_to_id(name)
            if i is None:
                raise TokenizerError(f"{d / 'tokenizer_config.json'}: eos_token {name!r} is not in tokenizer.json")
            if i not in eos:
                eos.append(i)
        return cls(tok, template, tuple(eos), source=str(d))

    @classmethod
    def from_gguf(cls, vocabulary) -> "Tokenizer":
        """The tokenizer a GGUF language model carries (qwenvl.checkpoints.gguf.GGUFVocabulary)."""
        return cls(vocabulary.tokenizer, vocabulary.chat_template, vocabulary.eos_token_ids, vocabulary.source)

    # -- ids -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.source}: token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text (<|image_pad|>, <|im_start|>) become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Ids -> text, keeping grounding markers and dropping eos/pad/turn/vision tokens."""
        return self._tok.decode([i for i in ids if i not in self._drop], skip_special_tokens=False)

    def is_dropped(self, token_id: int) -> bool:
        return token_id in self._drop

    def token_bytes_table(self, size: int) -> tuple[list[bytes], set[int]]:
        """Each id's exact output bytes (ids 0..size-1; ids past the tokenizer's vocab, the model's padding
        rows, map to b"") and the set of special ids. A grammar engine needs bytes, not the byte-level BPE
        alphabet ('Ġ' for a space); added tokens are literal text, so their bytes are their UTF-8."""
        table = [b""] * size
        added = self._tok.get_added_tokens_decoder()
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i >= size:
                continue
            table[i] = added[i].content.encode() if i in added else _byte_level_bytes(token)
        return table, {i for i in self.special_ids.values() if i < size}

    # -- chat template -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the checkpoint's template; a template's own `raise_exception` becomes an InputError."""
        if self._template is None:
            raise TokenizerError(f"{self.source}: no chat template (chat_template.json, chat_template.jinja "
                                 "or tokenizer_config.json's chat_template)")
        kwargs.setdefault("tools", None)
        kwargs.setdefault("documents", None)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        except jinja2.TemplateError as e:
            raise InputError(f"chat template rejected the conversation: {e}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _find_chat_template(d: Path, tokenizer_cfg: dict) -> str | None:
    # transformers' order: the processor's legacy chat_template.json wins over chat_template.jinja,
    # which wins over the tokenizer_config.json entry.
    legacy = _read_json(d / "chat_template.json").get("chat_template")
    if legacy:
        return legacy
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tpl = tokenizer_cfg.get("chat_template")
    if isinstance(tpl, list):     # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl


def _compile(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes (<, >, &); templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Streams text deltas; never emits half a UTF-8 character; all deltas + flush() == decode(all ids).

    A byte-level token can end inside a multi-byte character, so a window is decoded from the last point
    known to be a character boundary (`_prefix`), and only text past what was already emitted is returned,
    once the window no longer ends in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []      # kept ids (dropped specials never enter)
        self._prefix = 0              # window start: a character boundary
        self._read = 0                # ids[:_read] are already emitted

    def push(self, token_id: int) -> str:
        if self.tokenizer.is_dropped(token_id):
            return ""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        done = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """The held tail at end of stream (invalid bytes decode to U+FFFD, as in decode())."""
        decode = self.tokenizer.decode
        done = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]


def _byte_level_unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable bytes stand for themselves, the other 68 bytes
    for the code points 256.. in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_UNICODE_TO_BYTE = _byte_level_unicode_to_byte()


def _byte_level_bytes(token: str) -> bytes:
    return bytes(_UNICODE_TO_BYTE[c] for c in token)
