"""The grammar mask as its own cheap step in front of the sampler: constrained rows of the batch get
-inf outside their grammar, free rows are untouched, so both kinds share one batched step.

Matcher state is a function of the sequence's output tokens, not of the KV cache: before each mask the
matcher catches up on the tokens appended since (the sampled token the scheduler kept). A sequence
preempted by recompute keeps its output tokens, so its matcher needs nothing; a sequence whose output
ever shrank is replayed from a reset matcher.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from qwenvl.structured.spec import StructuredOutput

log = logging.getLogger(__name__)


@dataclass
class _State:
    matcher: object            # xgrammar.GrammarMatcher
    accepted: int = 0          # output tokens fed to the matcher
    broken: bool = False       # a token the grammar rejected (cannot happen under the mask): unconstrained


class GrammarMask:
    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None          # built on the first structured request (0.2 s at a 152k vocabulary)
        self._states: dict[str, _State] = {}

        self._compiler_lock = threading.Lock()

    def compile(self, spec: StructuredOutput):
        """The compiled grammar (cached); raises InvalidStructuredOutputError. Safe from any thread: the async
        engine compiles on its own threads (qwenvl/engine/grammar_compiles.py), never on the step loop."""
        with self._compiler_lock:
            if self._compiler is None:
                from qwenvl.structured.grammar import GrammarCompiler
                self._compiler = GrammarCompiler(self._tokenizer, self.vocab_size)
        return self._compiler.compile(spec)

    def add(self, request_id: str, spec: StructuredOutput, compiled=None) -> None:
        """Start a matcher on `compiled` (compiling `spec` here when not given); raises
        InvalidStructuredOutputError before anything is queued."""
        import xgrammar as xgr

        self._states[request_id] = _State(xgr.GrammarMatcher(compiled if compiled is not None else self.compile(spec)))

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def apply(self, logits: torch.Tensor, reqs: list) -> torch.Tensor:
        """logits[B, V] -> float32 logits with each constrained row masked (a copy; the input is not touched)."""
        rows = [i for i, r in enumerate(reqs) if r.request_id in self._states]
        rows = [i for i in rows if not self._sync(reqs[i]).broken]
        if not rows:
            return logits
        import xgrammar as xgr

        B, V = logits.shape
        bitmask = xgr.allocate_token_bitmask(B, self.vocab_size)           # [B, ceil(V/32)] int32
        for i in rows:
            self._states[reqs[i].request_id].matcher.fill_next_token_bitmask(bitmask, i)
        masked = logits.to(torch.float32, copy=True)
        xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), vocab_size=min(V, self.vocab_size),
                                        indices=rows)
        if V > self.vocab_size:                 # logits wider than the vocabulary the grammar knows
            masked[rows, self.vocab_size:] = float("-inf")
        return masked

    def _sync(self, req) -> _State:
        st = self._states[req.request_id]
        output = req.token_ids[req.num_prompt_tokens:]
        if len(output) < st.accepted:
            st.matcher.reset()
            st.accepted = 0
        for tok in output[st.accepted:]:
            if not st.broken and not st.matcher.accept_token(int(tok)):
                log.error("request %s: token %d rejected by its grammar; left unconstrained", req.request_id, tok)
                st.broken = True
            st.accepted += 1
        return st


class MaskedSampler:
    """The engine's sampler behind the grammar mask; same call shape, so the runner needs no change."""

    def __init__(self, sampler, mask: GrammarMask):
        self.sampler, self.mask = sampler, mask

    def __call__(self, logits: torch.Tensor, reqs: list):
        return self.sampler(self.mask.apply(logits, reqs), reqs)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)
        self.mask.release(request_id)
