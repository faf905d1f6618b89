"""bench/vs_llama_server.py's pure pieces (bench/serving_workload.py): the seeded workload, the image pool,
the messages both servers get, percentile math and a phase's summary; and the table it prints. (The bench
itself starts two servers and is not run here.)"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import serving_workload as wl  # noqa: E402

spec = importlib.util.spec_from_file_location("vs_llama_server", BENCH / "vs_llama_server.py")
vs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vs)


def test_workload_is_deterministic_for_a_seed_and_has_the_issues_shape():
    a, b, c = wl.make_workload(300, seed=5), wl.make_workload(300, seed=5), wl.make_workload(300, seed=6)
    assert a == b and a != c
    firsts = [r for r in a if r.earlier is None]
    seconds = [r for r in a if r.earlier is not None]
    assert 0.2 < len(seconds) / len(a) < 0.4                      # 30% second turns
    for r in a:
        assert r.max_tokens in (16, 64, 256) and 1 <= len(r.images) <= 2
        assert all(0 <= i < 12 for i in r.images) and len(set(r.images)) == len(r.images)
        assert 10 <= len(r.question.split()) <= 60
    for r in seconds:                                            # re-sends an earlier first turn's images
        before = a[r.earlier]
        assert r.earlier < r.index and before.earlier is None and r.images == before.images
    assert {r.max_tokens for r in a} == {16, 64, 256} and {len(r.images) for r in firsts} == {1, 2}


def test_image_pool_is_deterministic_sized_and_mixed():
    pool = wl.image_pool(3)
    assert [im.size for im in pool] == wl.POOL_SIZES and len(pool) == 12
    areas = [w * h for w, h in wl.POOL_SIZES]
    assert min(areas) == 448 * 448 and max(areas) == 1280 * 720
    again = wl.image_pool(3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(pool, again))
    other = wl.image_pool(4)
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(pool, other))
    doc, photo = np.asarray(pool[0]), np.asarray(pool[1])
    assert (doc > 240).all(axis=2).mean() > 0.5                  # a document is mostly white page
    assert (photo > 240).all(axis=2).mean() < 0.2
    assert wl.png_data_url(pool[0]).startswith("data:image/png;base64,iVBOR")


def test_messages_of_first_and_second_turns():
    work = [wl.BenchRequest(0, (3, 1), "What is this?", 16),
            wl.BenchRequest(1, (3, 1), "And the title?", 64, earlier=0)]
    urls = [f"u{i}" for i in range(12)]
    first = wl.messages(work[0], work, urls)
    assert first == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "u3"}}, {"type": "image_url", "image_url": {"url": "u1"}},
        {"type": "text", "text": "What is this?"}]}]
    second = wl.messages(work[1], work, urls)
    assert second[0] == first[0] and second[1] == {"role": "assistant", "content": wl.ASSISTANT_ANSWER}
    assert second[2] == {"role": "user", "content": "And the title?"}


def test_percentile_matches_numpy_and_handles_edges():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 99, 100):
            assert math.isclose(wl.percentile(xs, q), float(np.percentile(xs, q)), rel_tol=1e-12)
    assert math.isnan(wl.percentile([], 50))
    assert wl.percentile([1, 2, 3, 4], 50) == 2.5
    with pytest.raises(ValueError):
        wl.percentile([1.0], 101)


def test_summarize_a_phase():
    ok = wl.Record(sent=0.0, max_tokens=3, chunk_times=[0.5, 0.6, 0.8], completion_tokens=3, prompt_tokens=10,
                   finish_reason="length")
    short = wl.Record(sent=1.0, max_tokens=4, chunk_times=[1.2, 1.3], completion_tokens=2, prompt_tokens=30,
                      finish_reason="stop")
    failed = wl.Record(sent=2.0, max_tokens=4, error="APIConnectionError: refused")
    s = wl.summarize([ok, short, failed], wall_s=4.0)
    assert (s["requests"], s["answered"], s["exact_length"]) == (3, 2, 1)
    assert s["errors"] == ["APIConnectionError: refused"]
    assert s["req_per_s"] == 0.5 and s["out_tok_per_s"] == 5 / 4 and s["prompt_tokens_mean"] == 20
    assert math.isclose(s["ttft_p50_ms"], 350) and math.isclose(s["ttft_p99_ms"], 497)   # 200 and 500 ms
    itl = [100, 200, 100]                                       # 0.5->0.6->0.8 and 1.2->1.3
    assert math.isclose(s["itl_p50_ms"], float(np.percentile(itl, 50)))
    assert math.isclose(s["itl_p99_ms"], float(np.percentile(itl, 99)))
    # a server that sends no usage: the chunks are the tokens
    assert wl.Record(sent=0, max_tokens=2, chunk_times=[1, 2], finish_reason="length").output_tokens == 2


def test_table_and_ratios():
    base = dict(model="bundled", mode="bf16", concurrency=4, requests=8, exact_length=8, prompt_tokens_mean=300,
                peak_rss_mb=900.0, ttft_p50_ms=100.0, itl_p50_ms=10.0, itl_p99_ms=30.0)
    q = dict(base, side="qwenvl", req_per_s=2.0, out_tok_per_s=200.0, ttft_p99_ms=300.0, kv_blocks_after=0)
    l = dict(base, side="llama-server", req_per_s=1.0, out_tok_per_s=50.0, ttft_p99_ms=600.0)
    text = vs.table([q, l])
    assert text.splitlines()[2].startswith("| bundled | bf16 | 4 | qwenvl | 2.00 | 200.0 | 100 | 300 |")
    assert text.splitlines()[3].endswith("| 8/8 | - |")
    assert vs.ratios([q, l]) == ["bundled bf16 c=4: out tok/s x4.00, req/s x2.00, TTFT p99 300 vs 600 ms, "
                                 "ITL p99/p50 3.0"]


def test_image_token_limits_and_kv_size_follow_the_checkpoint(tmp_path):
    bundled = Path(__file__).resolve().parent.parent / "qwenvl" / "assets" / "bundled"
    assert vs.image_token_limits(bundled) == (3136 // 784, 160000 // 784)
    # bundled: 4 layers x 2 KV heads x head_dim 32 x (K, V) x 2 bytes = 1 KiB a token
    assert vs.kv_cache_gb(bundled, 1 << 20) == 1.01
    (tmp_path / "config.json").write_text('{"text_config": {"num_hidden_layers": 28, "num_key_value_heads": 2, '
                                          '"hidden_size": 1536, "num_attention_heads": 12}}')
    assert vs.kv_cache_gb(tmp_path, 32 * 4096) == round(28 * 2 * 128 * 4 * 32 * 4096 / (1 << 30) + 0.01, 2)


def test_the_default_run_is_each_models_plan_and_flags_apply_to_every_model():
    """Without --modes / --concurrency: the bundled model's full matrix, the 2B model's target rows (a default run
    under 15 minutes); given, they apply to every model; a bad model or mode is a clear exit."""
    from types import SimpleNamespace
    plan = lambda model, modes=None, concurrency=None: vs.model_plan(model, SimpleNamespace(modes=modes, concurrency=concurrency))
    assert plan("bundled") == (["bf16", "int8"], [1, 4, 16, 32])
    assert plan("2b") == (["int8"], [1, 16])
    assert plan("2b", "bf16,int8", "1,4,16,32") == (["bf16", "int8"], [1, 4, 16, 32])
    with pytest.raises(SystemExit, match="--models"):
        plan("7b")
    with pytest.raises(SystemExit, match="--modes"):
        plan("bundled", "fp8")
