"""Scheduler in a simulated engine loop (no torch, no model).

The fake runner keeps a 'KV pool' of slot -> fingerprint of the token prefix ending there, checks
that every key a chunk attends to holds the right fingerprint (so a prefix-cache or preemption bug
shows up as wrong KV), and picks the next token as a function of the fingerprints it read.
"""

import pytest

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.scheduler import Scheduler
from qwenvl.engine.sequence import SamplingParams, Sequence, SequenceStatus, VisionSpan

PAD = 99


class FakeRunner:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.kv: dict[int, int] = {}
        self.steps = 0

    def fp(self, s: Sequence, pos: int) -> int:
        keys = s.vision_keys_in(0, pos + 1)
        return hash((tuple(s.token_ids[: pos + 1]), keys))

    def slot(self, s, pos):
        bs = self.bm.block_size
        return s.block_table[pos // bs] * bs + pos % bs

    def run(self, out) -> dict[str, int]:
        self.steps += 1
        sampled = {}
        for c in out.chunks:
            s = c.seq
            assert c.start == s.num_computed_tokens and c.end <= s.num_tokens
            assert len(s.block_table) * self.bm.block_size >= c.end
            for pos in range(c.start, c.end):
                self.kv[self.slot(s, pos)] = self.fp(s, pos)
            for pos in range(c.end):     # everything the chunk attends to must be right
                assert self.kv[self.slot(s, pos)] == self.fp(s, pos), (s.request_id, pos)
            if c.needs_sample:
                sampled[s.request_id] = 100 + abs(self.kv[self.slot(s, c.end - 1)]) % 50
        return sampled


def drive(sched: Scheduler, max_steps=10_000, on_step=None):
    runner = sched.__dict__.setdefault("_fake_runner", FakeRunner(sched.bm))   # KV outlives one drive()
    finished = []
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        assert len({id(c.seq) for c in out.chunks}) == len(out.chunks)
        if on_step:
            on_step(out)
        finished += sched.postprocess(out, runner.run(out))
        sched.bm.check_invariants()
        assert runner.steps < max_steps, "no progress"
    return finished, runner


def make(rid, n, max_tokens=8, vision=(), base=0, **kw):
    toks = [(base + i) % 90 + 1 for i in range(n)]
    for v in vision:
        toks[v.token_offset: v.end] = [PAD] * v.num_tokens
    return Sequence(rid, toks, SamplingParams(temperature=0, max_tokens=max_tokens, **kw), vision=vision)


def outputs(seqs):
    return {s.request_id: s.output_token_ids for s in seqs}


def test_budget_max_seqs_and_chunked_prefill_coverage():
    bm = BlockManager(200, 4)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=16)
    seqs = [make(f"r{i}", n, base=i * 7) for i, n in enumerate([40, 3, 17, 1, 16, 9])]
    for s in seqs:
        sched.add(s)
    covered = {s.request_id: [] for s in seqs}

    def record(out):
        for c in out.chunks:
            covered[c.seq.request_id].append((c.start, c.end))

    finished, _ = drive(sched, on_step=record)
    assert {s.request_id for s in finished} == {s.request_id for s in seqs}
    for s in seqs:
        assert s.status is SequenceStatus.FINISHED and s.finish_reason == "length"
        assert s.num_output_tokens == 8
        ranges = covered[s.request_id]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert ranges[-1][1] == s.num_tokens - 1          # the last sampled token is never computed
    assert max(len(r) for r in covered.values()) > 8      # the 40-token prompt was chunked
    assert bm.num_used_blocks == 0


def test_preemption_keeps_outputs_identical():
    def run(num_blocks):
        bm = BlockManager(num_blocks, 2, enable_prefix_caching=False)
        sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
        seqs = [make(f"r{i}", 5 + 3 * i, max_tokens=12, base=i) for i in range(6)]
        for s in seqs:
            sched.add(s)
        drive(sched)
        assert bm.num_used_blocks == 0
        return outputs(seqs), sched.num_preemptions

    big, p0 = run(400)
    small, p1 = run(17)                   # 34 token slots; the longest request needs 32
    assert p0 == 0 and p1 > 0
    assert small == big


def test_preemption_with_prefix_cache_and_chunking():
    def run(num_blocks, budget):
        bm = BlockManager(num_blocks, 4)
        sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
        seqs = [make(f"r{i}", 12 + i, max_tokens=10, base=0) for i in range(5)]   # shared prefix
        for s in seqs:
            sched.add(s)
        drive(sched)
        assert bm.num_used_blocks == 0
        return outputs(seqs), sched.num_preemptions, bm.prefix_cache_hit_tokens

    ref, _, _ = run(500, 64)
    out, pre, hits = run(16, 10)
    assert pre > 0 and out == ref and hits > 0


def test_prefix_hits_shared_prefix_and_not_across_images():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    a = make("a", 20, max_tokens=2)
    sched.add(a)
    drive(sched)
    b = make("b", 22, max_tokens=2)                # same first 20 tokens
    sched.add(b)
    drive(sched)
    assert b.num_cached_tokens == 20 and bm.prefix_cache_hit_tokens == 20

    span = lambda h: [VisionSpan(h, 2, 12)]
    x = make("x", 20, max_tokens=2, vision=span("img1"))
    sched.add(x)
    drive(sched)
    assert x.num_cached_tokens == 0                # text prefix [1, 2] is shorter than a block
    y = make("y", 20, max_tokens=2, vision=span("img2"))    # same size, other image
    sched.add(y)
    drive(sched)
    assert y.num_cached_tokens == 0
    z = make("z", 20, max_tokens=2, vision=span("img1"))    # same image again
    sched.add(z)
    drive(sched)
    assert z.num_cached_tokens == 16
    assert z.output_token_ids == x.output_token_ids
    assert bm.num_used_blocks == 0


def test_abort_frees_blocks_at_once():
    bm = BlockManager(50, 4)
    sched = Scheduler(bm, max_num_batched_tokens=8)
    s1, s2 = make("a", 30), make("b", 6)
    sched.add(s1); sched.add(s2)
    runner = FakeRunner(bm)
    out = sched.schedule()
    sched.postprocess(out, runner.run(out))
    assert bm.num_used_blocks > 0
    assert sched.abort("a") is s1 and s1.status is SequenceStatus.ABORTED and s1.block_table == []
    assert sched.abort("b") is s2 and sched.abort("nope") is None
    assert bm.num_used_blocks == 0 and not sched.has_unfinished()
    # abort between schedule and postprocess
    s3 = make("c", 5)
    sched.add(s3)
    out = sched.schedule()
    sampled = runner.run(out)
    sched.abort("c")
    assert sched.postprocess(out, sampled) == [] and bm.num_used_blocks == 0


def test_prompt_that_never_fits_fails_clearly():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm)
    with pytest.raises(ValueError, match="KV cache holds 16"):
        sched.add(make("big", 16))
    # fits as a prompt, but prompt + output outgrows the whole pool: finished as "length", no loop
    s = make("grow", 12, max_tokens=100)
    sched.add(s)
    finished, _ = drive(sched, max_steps=50)
    assert s in finished and s.finish_reason == "length" and s.error and bm.num_used_blocks == 0
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make("x", 2)); sched.add(make("x", 2))


def test_stops_eos_and_stop_token_ids():
    bm = BlockManager(50, 4)
    sched = Scheduler(bm, eos_token_ids=[7])
    a = make("a", 4, max_tokens=50)
    b = make("b", 4, max_tokens=50, stop_token_ids=[8])
    c = make("c", 4, max_tokens=3, ignore_eos=True)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    fin = sched.postprocess(out, {"a": 7, "b": 8, "c": 7})
    assert {s.request_id for s in fin} == {"a", "b"} and a.finish_reason == b.finish_reason == "stop"
    assert a.output_token_ids == [7]              # the stop token stays in token_ids
    while sched.has_unfinished():
        out = sched.schedule()
        fin = sched.postprocess(out, {"c": 7})
    assert c.output_token_ids == [7, 7, 7] and c.finish_reason == "length"


def test_encoder_budget_splits_before_second_image():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, max_num_batched_tokens=100, max_encoder_tokens_per_step=10)
    vis = [VisionSpan("i1", 2, 8), VisionSpan("i2", 12, 8)]
    s = make("a", 30, vision=vis, max_tokens=2)
    sched.add(s)
    out = sched.schedule()
    assert [(c.start, c.end) for c in out.chunks] == [(0, 12)] and out.chunks[0].encode == vis[:1]
    sched.postprocess(out, {})
    out = sched.schedule()
    assert [(c.start, c.end) for c in out.chunks] == [(12, 30)] and out.chunks[0].encode == vis[1:]
    # an image larger than the budget still goes through when it is alone in the step
    sched2 = Scheduler(BlockManager(100, 4), max_encoder_tokens_per_step=4,
                       is_encoder_cached=lambda h: h == "cached")
    t = make("t", 30, vision=[VisionSpan("big", 2, 8), VisionSpan("cached", 12, 8)], max_tokens=1)
    sched2.add(t)
    out = sched2.schedule()
    assert (out.chunks[0].start, out.chunks[0].end) == (0, 30) and [v.content_hash for v in out.chunks[0].encode] == ["big"]


def test_decodes_are_not_starved_by_a_long_prefill():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, max_num_batched_tokens=8)
    short, long = make("short", 3, max_tokens=5), make("long", 100, max_tokens=1, base=5)
    sched.add(short); sched.add(long)
    runner = FakeRunner(bm)
    steps = 0
    while not short.is_finished:
        out = sched.schedule()
        assert sum(c.num_tokens for c in out.chunks) <= 8
        sched.postprocess(out, runner.run(out))
        steps += 1
    assert steps == 5 and not long.is_finished      # one decode per step while the long one prefills


def test_prefill_tokens_are_capped_only_in_steps_that_decode():
    def run(cap):
        bm = BlockManager(200, 4)
        sched = Scheduler(bm, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=cap)
        a, b, c = make("a", 70, max_tokens=30), make("b", 100, max_tokens=4, base=7), make("c", 40, max_tokens=3, base=9)
        sched.add(a)
        seen = []

        def on_step(out):
            decodes = [ch for ch in out.chunks if ch.num_tokens == 1 and not ch.is_prefill]
            prefill = sum(ch.num_tokens for ch in out.chunks if ch.is_prefill or ch.seq.num_preemptions)
            seen.append((len(decodes), prefill))
            if len(seen) == 2:               # a decodes from step 3 on; b and c arrive then
                sched.add(b); sched.add(c)
        finished, _ = drive(sched, on_step=on_step)
        return outputs(finished), seen

    want, plain = run(None)
    got, capped = run(10)
    assert got == want                                    # the same tokens, only spread over more steps
    assert any(d and p > 10 for d, p in plain)            # uncapped: one step decodes beside a 60-token prefill
    assert all(p <= 10 for d, p in capped if d)           # capped wherever a decode runs
    assert capped[:2] == plain[:2] == [(0, 64), (0, 6)]   # a's own prefill, with nothing decoding: not capped
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding"):
        Scheduler(BlockManager(8, 4), max_prefill_tokens_while_decoding=0)


def test_encode_ahead_stops_before_uncached_images_and_lets_others_pass():
    bm = BlockManager(200, 4)
    cached: set[str] = set()
    sched = Scheduler(bm, max_num_batched_tokens=100, encode_ahead=True, is_encoder_cached=cached.__contains__)
    a = make("a", 30, vision=[VisionSpan("i1", 4, 8), VisionSpan("i2", 14, 8)], max_tokens=2)
    b = make("b", 20, vision=[VisionSpan("i1", 0, 8)], max_tokens=2, base=3)     # the image comes first
    c = make("c", 10, max_tokens=2, base=6)
    for s in (a, b, c):
        sched.add(s)
    runner = sched._fake_runner = FakeRunner(bm)        # drive() below goes on with the same KV
    out = sched.schedule()
    # a stops before i1; b cannot start at all (waits in the queue, c passes it); i1 is asked for once
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in out.chunks] == [("a", 0, 4), ("c", 0, 10)]
    assert [(span.content_hash, seq.request_id) for span, seq in out.encode] == [("i1", "a")]
    assert [s.request_id for s in sched.waiting] == ["b"] and all(not ch.encode for ch in out.chunks)
    sched.postprocess(out, runner.run(out))
    out = sched.schedule()                                # nothing cached yet: c decodes, i1 asked again
    assert [(ch.seq.request_id, ch.start) for ch in out.chunks] == [("c", 10)] and len(out.encode) == 1
    sched.postprocess(out, runner.run(out))
    cached.add("i1")                                      # the runner finished i1
    out = sched.schedule()
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in out.chunks] == [("a", 4, 14), ("b", 0, 20)]
    assert [span.content_hash for span, _ in out.encode] == ["i2"]
    sched.postprocess(out, runner.run(out))
    cached.add("i2")
    finished, _ = drive(sched)
    assert {s.request_id for s in finished} == {"a", "b"} and bm.num_used_blocks == 0
    with pytest.raises(ValueError, match="chunked prefill"):
        Scheduler(BlockManager(8, 4), encode_ahead=True, enable_chunked_prefill=False)
