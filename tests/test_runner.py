"""ModelRunner with a fake model that follows the model contract: the paged engine loop (chunked
prefill through images, preemption, prefix and encoder caches, seeds) gives exactly the tokens of a
plain one-request-at-a-time loop over ContiguousKVCache."""

import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.encoder_cache import EncoderCache
from qwenvl.engine.runner import ModelRunner
from qwenvl.engine.sampler import Sampler
from qwenvl.engine.scheduler import Scheduler
from qwenvl.engine.sequence import SamplingParams, Sequence
from qwenvl.layers.attention import ContiguousKVCache
from qwenvl.layers.paged_attention import PagedKVPool

V, D, HQ, HKV, DH, LAYERS, PAD, PATCH = 64, 32, 4, 2, 8, 2, 60, 6


class FakeVLM(nn.Module):
    def __init__(self, deepstack_levels=1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64) * 0.3)
        self.emb, self.pe = r(V, D), r(3, 128, D)
        self.vis = r(4 * PATCH, D)
        self.wq, self.wk, self.wv = r(LAYERS, D, HQ * DH), r(LAYERS, D, HKV * DH), r(LAYERS, D, HKV * DH)
        self.wo, self.head = r(LAYERS, HQ * DH, D), r(D, V)
        self.levels = deepstack_levels
        self.encode_calls = 0

    def encode_vision(self, pixel_values, grid_thw):
        self.encode_calls += 1
        assert pixel_values.shape[0] == int(grid_thw.prod(-1).sum())
        e = pixel_values.view(-1, 4 * PATCH) @ self.vis                       # 2x2 merge -> [M, D]
        return e, [e * (0.5 + i) for i in range(self.levels)]

    def forward(self, input_ids, positions, attn, vision_embeds=None, deepstack=()):
        x = self.emb[input_ids] + sum(self.pe[i][positions[i]] for i in range(3))
        mask = input_ids == PAD
        if vision_embeds is not None:
            assert vision_embeds.shape[0] == int(mask.sum())
            x = x.index_put((mask,), vision_embeds + x[mask])
        n = x.shape[0]
        for i in range(LAYERS):
            o = attn.attend(i, (x @ self.wq[i]).view(n, HQ, DH), (x @ self.wk[i]).view(n, HKV, DH),
                            (x @ self.wv[i]).view(n, HKV, DH))
            x = torch.tanh(x + o.reshape(n, -1) @ self.wo[i])
            if i < len(deepstack):
                x = x.index_put((mask,), x[mask] + deepstack[i])
        return x

    def compute_logits(self, hidden):
        return (hidden @ self.head).float()


@dataclass
class Item:
    content_hash: str
    pixel_values: torch.Tensor
    grid_thw: tuple
    token_offset: int
    num_tokens: int


def image(name, h, w, offset):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))      # the same pixels in every process
    return Item(name, torch.randn(h * w, PATCH, generator=g, dtype=torch.float64), (1, h, w), offset, h * w // 4)


def request(rid, text_before, img, text_after, params):
    toks = list(text_before) + [PAD] * img.num_tokens + list(text_after)
    # M-RoPE-like positions: text, then a 2-D grid for the image, text resumes at max + 1
    t0 = len(text_before)
    _, h, w = img.grid_thw
    h, w = h // 2, w // 2
    rows = [list(range(t0)) for _ in range(3)]
    rows[0] += [t0] * (h * w)
    rows[1] += [t0 + i // w for i in range(h * w)]
    rows[2] += [t0 + i % w for i in range(h * w)]
    nxt = max(max(r) for r in rows) + 1
    for k in range(len(text_after)):
        for r in rows:
            r.append(nxt + k)
    pos = torch.tensor(rows)
    return Sequence(rid, toks, params, positions=pos, next_position=int(pos.max()) + 1, vision=[img])


def reference(model, seq: Sequence):
    """One request alone: full prefill over a contiguous cache, then one token at a time."""
    sampler = Sampler(never_sample=[PAD])
    cache = ContiguousKVCache(LAYERS)
    s = Sequence(seq.request_id, seq.prompt_token_ids, seq.params, seq.prompt_positions, seq.next_position,
                 list(seq.vision_items.values()))
    embeds, ds = None, []
    if s.vision_items:
        it = next(iter(s.vision_items.values()))
        embeds, ds = model.encode_vision(it.pixel_values, torch.tensor([it.grid_thw]))
    ids = torch.tensor(s.token_ids)
    h = model.forward(ids, torch.tensor(s.positions_for(0, s.num_tokens)), cache, embeds, ds)
    while True:
        tok = sampler(model.compute_logits(h[-1:]), [s]).token_ids[0]
        s.append_token(tok)
        if s.num_output_tokens >= s.params.max_tokens:
            return s.output_token_ids
        p = s.next_position + s.num_output_tokens - 1
        h = model.forward(torch.tensor([tok]), torch.full((3, 1), p), cache)


def engine(model, seqs, num_blocks, block_size=4, budget=16, enc_budget=None, impl="fast", cache_tokens=1000,
           device="cpu"):
    bm = BlockManager(num_blocks, block_size)
    enc = EncoderCache(cache_tokens)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget, max_encoder_tokens_per_step=enc_budget,
                      is_encoder_cached=enc.__contains__)
    pool = PagedKVPool(LAYERS, num_blocks, block_size, HKV, DH, torch.float64, device)
    runner = ModelRunner(model, pool, Sampler(never_sample=[PAD]), encoder_cache=enc, attn_impl=impl)
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        sampled, lps = runner.step(out.chunks)
        sched.postprocess(out, sampled, lps)
        steps += 1
        assert steps < 2000
    assert bm.num_used_blocks == 0
    return sched, bm, runner


def make_seqs(params):
    a = image("cat", 4, 8, 3)          # 8 vision tokens
    b = image("dog", 4, 8, 3)          # same size, other content
    return [
        request("r0", [1, 2, 3], a, [4, 5, 6, 7], params),
        request("r1", [1, 2, 3], b, [4, 5, 6, 7], params),
        request("r2", [1, 2, 3], a, [9, 5, 9, 9, 10], params),         # same image as r0
        Sequence("r3", [7, 8, 9, 10, 11, 12, 13], params),             # text only
    ]


def test_engine_matches_reference_greedy_with_chunking_preemption_and_caches():
    model = FakeVLM()
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    want = {s.request_id: reference(model, s) for s in make_seqs(params)}
    assert want["r0"] != want["r1"]                       # the images matter
    for impl, blocks, budget in [("fast", 200, 16), ("reference", 200, 5), ("fast", 9, 7)]:
        seqs = make_seqs(params)
        sched, bm, runner = engine(model, seqs, blocks, budget=budget, impl=impl, enc_budget=8)
        got = {s.request_id: s.output_token_ids for s in seqs}
        assert got == want, (impl, blocks, budget)
        assert all(len(s.output_logprobs) == 6 and s.output_logprobs[0] for s in seqs)
        if blocks == 9:
            assert sched.num_preemptions > 0
        if budget == 16:
            # r2 shows r0's image again: encoded once, and r0's computed blocks are reused
            assert runner.num_encoded_items == 2 and runner.encoder_cache.hits > 0
            assert seqs[2].num_cached_tokens == 8 and bm.prefix_cache_hit_tokens >= 8
    # all in one step: the shared image is still encoded once
    seqs = make_seqs(params)
    sched, bm, runner = engine(model, seqs, 200, budget=64)
    assert runner.num_encoded_items == 2 and {s.request_id: s.output_token_ids for s in seqs} == want


def test_a_model_that_prefers_the_image_pad_token_never_gets_it_back_as_input():
    # Sampled and fed back, a pad token next to another request's image prefill would count as a placeholder
    # with no vision row (the step raised). The engine's sampler never produces it.
    class PadLovingVLM(FakeVLM):
        def compute_logits(self, hidden):
            logits = super().compute_logits(hidden)
            logits[:, PAD] += 100.0                 # PAD is every step's argmax
            return logits

    model = PadLovingVLM()
    params = SamplingParams(temperature=0, max_tokens=6)
    want = {s.request_id: reference(model, s) for s in make_seqs(params)}
    seqs = make_seqs(params)
    engine(model, seqs, 200, budget=7)              # decodes share steps with image prefill chunks
    assert {s.request_id: s.output_token_ids for s in seqs} == want
    assert all(PAD not in s.output_token_ids for s in seqs)


def test_seeded_sampling_same_alone_and_batched():
    model = FakeVLM(deepstack_levels=0)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=123)
    alone = make_seqs(params)[:1]
    engine(model, alone, 100)
    batch = make_seqs(params)
    engine(model, batch, 100, budget=8)
    assert batch[0].output_token_ids == alone[0].output_token_ids
    assert batch[0].output_token_ids == reference(model, make_seqs(params)[0])


def test_encoder_cache_lru():
    c = EncoderCache(max_tokens=10)
    c.put("a", torch.zeros(4, 2)); c.put("b", torch.zeros(4, 2))
    assert c.get("a") is not None                       # a is now the most recent
    c.put("c", torch.zeros(4, 2))                       # evicts b
    assert "b" not in c and "a" in c and "c" in c and c.num_tokens == 8
    c.put("huge", torch.zeros(11, 2))
    assert "huge" not in c and c.hits == 1 and c.get("b") is None and c.misses == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda():
    model = FakeVLM()
    params = SamplingParams(temperature=0, max_tokens=6)
    want = {s.request_id: reference(model, s) for s in make_seqs(params)}
    model.cuda()
    for impl, blocks, budget in [("fast", 200, 16), ("fast", 9, 7), ("reference", 50, 5)]:
        seqs = make_seqs(params)
        engine(model, seqs, blocks, budget=budget, impl=impl, enc_budget=8, device="cuda")
        assert {s.request_id: s.output_token_ids for s in seqs} == want


def test_a_step_hands_the_model_every_chunks_own_positions():
    """Decode chunks' positions are gathered into one tensor per run of them (issue 37): a step that mixes
    decodes and prefill chunks (one through an image) still hands the model, column by column, each chunk's
    positions_for, and the image's rows in order."""
    model = FakeVLM()
    seen = []
    forward = model.forward

    def capture(input_ids, positions, attn, vision_embeds=None, deepstack=()):
        seen.append((positions.clone(), attn.query_lens, None if vision_embeds is None else vision_embeds.shape[0]))
        return forward(input_ids, positions, attn, vision_embeds, deepstack)

    model.forward = capture
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    seqs = make_seqs(params)
    bm, enc = BlockManager(64, 4), EncoderCache(1000)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=9, is_encoder_cached=enc.__contains__)
    runner = ModelRunner(model, PagedKVPool(LAYERS, 64, 4, HKV, DH, torch.float64), Sampler(never_sample=[PAD]),
                         encoder_cache=enc)
    for s in seqs:
        sched.add(s)
    mixed = 0
    while sched.has_unfinished():
        out = sched.schedule()
        want = torch.cat([torch.tensor(c.seq.positions_for(c.start, c.end)).view(3, -1) for c in out.chunks], dim=1)
        sched.postprocess(out, *runner.step(out.chunks))
        positions, query_lens, _ = seen[-1]
        assert torch.equal(positions, want)
        mixed += 1 in query_lens and any(q > 1 for q in query_lens)
    assert mixed > 0 and bm.num_used_blocks == 0
