"""Per-token cost of a grammar mask (xgrammar vs llguidance) next to the full-vocabulary sampling work.

Both libraries get the same byte vocabulary: the bundled model's own (5014 ids) and a synthetic
byte-level one of 151,936 ids (Qwen2/2.5/3-VL's embedding size; no hub checkpoint is available here).
A random walk samples uniformly among the allowed tokens of a JSON-schema grammar; the per-token time
of filling the mask is reported with the time of one softmax + argmax over the same vocabulary in the
same run (the sampler's unavoidable full-vocabulary work), and the ratio. Also counts which schemas of a
small coverage set each library compiles.

    .venv/bin/python bench/structured_mask_overhead.py [--tokens 200]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import llguidance
import llguidance.torch as llg_torch
import torch
import xgrammar as xgr

from qwenvl.engine.llm_engine import BUNDLED_MODEL_DIR
from qwenvl.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
COVERAGE = {
    "enum+const": {"type": "object", "properties": {"k": {"enum": [1, "x", None]}, "c": {"const": 3}}},
    "anyOf": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer"}]},
    "$ref/$defs": {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "number"}}}},
                   "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}},
    "pattern": {"type": "string", "pattern": "^[a-z]{2,5}$"},
    "format date": {"type": "string", "format": "date"},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "oneOf": {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"required": ["a"]}]},
    "recursive": {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
                  "$ref": "#/$defs/n"},
}


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    letters = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,:;{}[]\"' \n"
    vocab = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    while len(vocab) < size - 1:
        tok = bytes(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        if rng.random() < 0.3:
            tok = b" " + tok
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    return vocab + [b"<|im_end|>"]          # the last id: eos (special)


class XgrBackend:
    def __init__(self, vocab, eos):
        info = xgr.TokenizerInfo([v if i != eos else b"" for i, v in enumerate(vocab)], vocab_type=xgr.VocabType.RAW,
                                 vocab_size=len(vocab), stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.V = len(vocab)

    def matcher(self, schema):
        return xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask, 0)

    def accept(self, m, t):
        assert m.accept_token(t)

    def done(self, m):
        return m.is_terminated()


class LlgBackend:
    def __init__(self, vocab, eos):
        class Tok:
            eos_token_id, bos_token_id, tokens, special_token_ids = eos, None, vocab, [eos]

            def __call__(self, s):
                return []
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tok()))
        self.V = len(vocab)

    def matcher(self, schema):
        g = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(self.tok, g)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, m, bitmask):
        llg_torch.fill_next_token_bitmask(m, bitmask, 0)

    def accept(self, m, t):
        assert m.consume_token(t), m.get_error()

    def done(self, m):
        return m.is_stopped()


def walk(backend, eos: int, tokens: int, seed: int = 0) -> tuple[float, int]:
    """Seconds per mask fill over a random walk of allowed tokens (restarting when the grammar ends)."""
    rng = torch.Generator().manual_seed(seed)
    bitmask = xgr.allocate_token_bitmask(1, backend.V)
    m, spent, n = backend.matcher(SCHEMA), 0.0, 0
    while n < tokens:
        t0 = time.perf_counter()
        backend.fill(m, bitmask)
        spent += time.perf_counter() - t0
        n += 1
        logits = torch.zeros(1, backend.V)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        allowed = torch.isfinite(logits[0]).nonzero().flatten()
        tok = int(allowed[torch.randint(len(allowed), (1,), generator=rng)])
        if tok == eos:
            m = backend.matcher(SCHEMA)
            continue
        backend.accept(m, tok)
    return spent / n, n


def full_vocab_sampling(V: int, reps: int = 50) -> float:
    logits = torch.randn(1, V)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.softmax(logits, dim=-1).argmax(dim=-1)
    return (time.perf_counter() - t0) / reps


def coverage(backend) -> list[str]:
    ok = []
    for name, schema in COVERAGE.items():
        try:
            backend.matcher(schema)
            ok.append(name)
        except Exception:                          # noqa: BLE001 - counting what each library compiles
            pass
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    bundled, _ = tok.token_bytes_table(tok.vocab_size)
    for label, vocab in (("bundled 5014", bundled), ("synthetic 151936", synthetic_vocab(151936))):
        eos = len(vocab) - 1 if label.startswith("synthetic") else tok.eos_token_ids[0]
        base = full_vocab_sampling(len(vocab))
        print(f"[{label}] softmax+argmax over the vocab: {base * 1e6:.1f} us/token")
        for name, cls in (("xgrammar", XgrBackend), ("llguidance", LlgBackend)):
            t0 = time.perf_counter()
            backend = cls(vocab, eos)
            setup = time.perf_counter() - t0
            try:
                per, n = walk(backend, eos, args.tokens)
            except AssertionError as e:                 # a mask that let a rejected token through
                print(f"  {name:10s} mask walk failed: {str(e).splitlines()[0][:160]}")
                continue
            print(f"  {name:10s} tokenizer setup {setup * 1e3:7.1f} ms; mask fill {per * 1e6:8.1f} us/token "
                  f"over {n} tokens = {per / base:5.2f}x the softmax+argmax")
            if label.startswith("bundled"):
                cov = coverage(backend)
                print(f"  {name:10s} compiles {len(cov)}/{len(COVERAGE)} coverage schemas; missing: "
                      f"{sorted(set(COVERAGE) - set(cov))}")


if __name__ == "__main__":
    main()
