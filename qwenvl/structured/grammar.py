"""Compile a StructuredOutput into a token-level grammar for one checkpoint's vocabulary.

Library choice, xgrammar (measured by bench/structured_mask_overhead.py on this shared 2-core CPU): a mask
fill costs ~31 us/token at the bundled model's 5014-id vocabulary and ~0.86 ms/token at 151,936 ids, 1.5-2.3x
one softmax+argmax over the same vocabulary, and it compiled all 9 schema features of the bench's coverage set
($ref/$defs, recursion, anyOf/oneOf/allOf, enum/const, pattern, format, min/maxItems). llguidance, fed the same
raw byte vocabulary, let grammar-violating tokens through its mask there (it needs a real tokenize function we
could not give it without transformers), so it lost on correctness before speed.

The vocabulary comes from the checkpoint's own tokenizer as exact bytes per id; special tokens (turn
markers, vision pads) map to b"" so the grammar never admits them, and the eos ids are the stop tokens,
allowed only where the grammar is complete. Output is bounded: no free whitespace (compact separators),
numbers of at most 16 digits (and 3 of exponent) where the schema does not bound them, and json_object is
rooted at an object.
"""

from __future__ import annotations

import functools
import re

import xgrammar as xgr

from qwenvl.structured.number_bounds import bound_numbers
from qwenvl.structured.spec import InvalidStructuredOutputError, StructuredOutput

JSON_OBJECT_SCHEMA = '{"type":"object"}'
TOOL_OPEN, TOOL_CLOSE = "<tool_call>\n", "\n</tool_call>"


class GrammarCompiler:
    """One per engine: the checkpoint's vocabulary + a compile cache keyed by the (hashable) spec."""

    def __init__(self, tokenizer, vocab_size: int):
        table, special = tokenizer.token_bytes_table(vocab_size)
        stop = [i for i in tokenizer.eos_token_ids if i < vocab_size]
        vocab = [b"" if i in special or _has_control_bytes(tok) else tok for i, tok in enumerate(table)]
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size
        self.compile = functools.lru_cache(maxsize=256)(self._compile)

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":
                return self._compiler.compile_grammar(_json_grammar(JSON_OBJECT_SCHEMA))
            body = _json_grammar(spec.schema_json)
            if spec.kind == "json_schema":
                return self._compiler.compile_grammar(body)
            grammar = xgr.Grammar.concat(_literal(TOOL_OPEN), body, _literal(TOOL_CLOSE))
            return self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as e:       # xgrammar reports unsupported/invalid schemas so
            raise InvalidStructuredOutputError(f"cannot compile the schema: {compiler_message(e)}") from None

    def matcher(self, spec: StructuredOutput) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compile(spec))


def _json_grammar(schema_json: str) -> xgr.Grammar:
    """The schema's grammar with compact separators and bounded number digits (number_bounds.py)."""
    grammar = xgr.Grammar.from_json_schema(schema_json, any_whitespace=False, separators=(",", ":"),
                                           strict_mode=True)
    return xgr.Grammar.from_ebnf(bound_numbers(str(grammar)))


# xgrammar's messages start with its log prefix: "[08:40:15] /project/cpp/json_schema_converter.cc:5088: "
_LOG_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+\.(?:cc|h|cpp|hpp):\d+: ")


def compiler_message(e: BaseException) -> str:
    """The compiler's error for a client: no timestamp, no C++ source path, one line, bounded."""
    text = " ".join(_LOG_PREFIX.sub("", str(e)).split())
    return text[:500] or type(e).__name__


def _has_control_bytes(token: bytes) -> bool:
    """JSON never holds a raw control character (strings escape them; compact output has no whitespace), but
    xgrammar's rule for strings with maxLength admits them (measured with 0.2.9: `[^"\\\r\n]`). Such tokens are
    kept out of every grammar; newline stays, as the tool-call tags need it and string rules exclude it."""
    return any(b < 0x20 and b != 0x0A for b in token)


def _literal(text: str) -> xgr.Grammar:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return xgr.Grammar.from_ebnf(f'root ::= "{escaped}"')
