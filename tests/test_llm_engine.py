"""The engine through the public API: batching, preemption, caches, seeds, aborts (tiny random checkpoint)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl import LLM, SamplingParams
from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.layers import int8_vnni

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def image(seed: int, size=(84, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def ask(img, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"image": img}, {"text": question}]}]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen2_vl")


def fresh(ckpt, **options) -> LLM:
    return LLM(ckpt, dtype="float32", **options)


@pytest.fixture(params=[None, "int8", "int8 fbgemm", "int4"])
def quantization(request, monkeypatch):
    """The engine's bookkeeping must not care what the linears are: these run again on int8 weights, in the
    layout this CPU picks for a tiny model (qwenvl's int8 tiles where the kernels build, else plain: its
    layers are too small for fbgemm's) and with every
    layer forced into fbgemm's layout, whose products big models use here; and on int4 weights through
    qwenvl's own kernels where they build (tests/test_kernels_int4.py checks they do here), whose
    activation rounding is per row, so batched rows still equal each row alone."""
    mode, _, layout = (request.param or "").partition(" ")
    if layout:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            pytest.skip("this PyTorch build has no fbgemm")
        monkeypatch.setenv(int8_vnni.LAYOUT_ENV, layout)
        int8_vnni.int8_layout.cache_clear()
        request.addfinalizer(int8_vnni.int8_layout.cache_clear)
    return mode or None


def test_eight_concurrent_requests_match_each_alone(ckpt, quantization):
    convs = [ask(image(i, size=(56 + 28 * (i % 3), 56 + 28 * (i % 2))), f"question {i}?") for i in range(8)]
    batched = fresh(ckpt, quantization=quantization).generate(convs, GREEDY)
    for conv, out in zip(convs, batched):
        alone = fresh(ckpt, enable_prefix_caching=False, quantization=quantization).chat(conv, GREEDY)
        assert out.token_ids == alone.token_ids
        assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_tiny_kv_pool_preempts_and_every_request_completes_unchanged(ckpt, quantization):
    convs = [ask(image(10 + i), f"describe {i}") for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = fresh(ckpt, quantization=quantization).generate(convs, params)
    tight = fresh(ckpt, num_kv_blocks=12, block_size=8, max_num_batched_tokens=64, quantization=quantization)
    outs = tight.generate(convs, params)
    assert tight.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.stats()["kv_blocks_used"] == 0


def test_second_turn_reuses_the_prefix_cache_and_matches_uncached(ckpt, quantization):
    llm = fresh(ckpt, quantization=quantization)
    turn1 = ask(image(1), "What is in the picture?")
    first = llm.chat(turn1, GREEDY)
    turn2 = turn1 + [{"role": "assistant", "content": first.text or "ok"},
                     {"role": "user", "content": "And the colours?"}]
    second = llm.chat(turn2, GREEDY)
    stats = llm.stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and second.cached_tokens > 0
    uncached = fresh(ckpt, enable_prefix_caching=False, quantization=quantization)
    assert second.token_ids == uncached.chat(turn2, GREEDY).token_ids


def test_same_image_in_another_conversation_hits_the_encoder_cache(ckpt):
    llm = fresh(ckpt)
    img = image(2)
    llm.chat(ask(img, "first question"), GREEDY)
    encoded = llm.engine.runner.num_encoded_items
    other = [{"role": "system", "content": "Answer briefly."}] + ask(img, "second question")
    out = llm.chat(other, GREEDY)
    assert llm.stats()["encoder_cache_hits"] >= 1
    assert llm.engine.runner.num_encoded_items == encoded        # the vision tower did not run again
    assert out.token_ids == fresh(ckpt, enable_prefix_caching=False).chat(other, GREEDY).token_ids


def test_different_images_of_the_same_size_never_share_cache_entries(ckpt):
    llm = fresh(ckpt)
    a, b = image(3), image(4)
    llm.chat(ask(a, "same question"), GREEDY)
    before = llm.stats()
    out_b = llm.chat(ask(b, "same question"), GREEDY)
    after = llm.stats()
    assert after["encoder_cache_hits"] == before["encoder_cache_hits"]
    first_pad = llm.engine.prepare(ask(b, "same question")).vision[0].token_offset
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] <= first_pad
    assert out_b.token_ids == fresh(ckpt).chat(ask(b, "same question"), GREEDY).token_ids


def test_seeded_sample_is_the_same_alone_and_in_a_batch(ckpt):
    conv = ask(image(5), "tell me a story")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = fresh(ckpt).chat(conv, seeded)
    company = [ask(image(6 + i), f"other {i}") for i in range(3)]
    batch = fresh(ckpt).generate(company[:2] + [conv] + company[2:],
                                 [SamplingParams(temperature=1.0, max_tokens=16)] * 2 + [seeded]
                                 + [SamplingParams(temperature=1.0, max_tokens=16)])
    assert batch[2].token_ids == alone.token_ids


def test_aborted_requests_free_their_blocks(ckpt):
    llm = fresh(ckpt)
    engine = llm.engine
    for i in range(3):
        engine.add_request(f"r{i}", engine.prepare(ask(image(20 + i), "long answer")),
                           SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    for i in range(3):
        assert engine.abort(f"r{i}").finish_reason == "abort"
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished()


def test_async_stream_abandoned_by_its_client_is_aborted(ckpt):
    llm = fresh(ckpt)
    engine = AsyncEngine(llm.engine)

    async def scenario():
        prompt = await engine.prepare(ask(image(30), "stream please"))
        deltas = []
        async for out in engine.generate(prompt, SamplingParams(max_tokens=500, ignore_eos=True)):
            deltas.append(out)
            if len(deltas) == 3:
                break                                   # the client goes away
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.stats()["kv_blocks_used"] == 0 and engine.stats()["num_running"] == 0:
                break
        full = [o async for o in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=5))]
        await engine.shutdown(1.0)
        return deltas, full

    deltas, full = asyncio.run(scenario())
    assert len(deltas) == 3 and not deltas[-1].finished
    assert llm.engine.stats()["kv_blocks_used"] == 0
    assert full[-1].finished and full[-1].finish_reason in ("stop", "length")
    assert "".join(o.delta_text for o in full) == full[-1].text


def test_outputs_follow_the_public_contract(ckpt):
    llm = fresh(ckpt)
    conv = ask(image(7), "hello")
    out = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=6, logprobs=3))
    assert len(out.logprobs) == len(out.token_ids)
    for chosen, lp in zip(out.token_ids, out.logprobs):
        assert chosen in lp and len(lp) >= 3 and all(v <= 0 for v in lp.values())
    assert out.prompt_tokens > out.image_tokens > 0
    eos = set(llm.engine.tokenizer.eos_token_ids)
    if out.finish_reason == "stop":
        assert out.token_ids[-1] in eos
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == 6
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_stop_string_cuts_the_text_and_ends_the_request(ckpt):
    llm = fresh(ckpt)
    conv = ask(image(8), "say something")
    full = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    text = full.text
    assert len(text) > 4, "the tiny model should produce some text"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(ckpt):
    """Finishing is decided in one place: a stop string in the text the max_tokens-th token adds wins over
    the length limit (the request stopped because of the string, and its text is cut)."""
    llm = fresh(ckpt)
    conv = ask(image(8), "say something")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    full = llm.chat(conv, params)
    last = llm.engine.tokenizer.decode(full.token_ids[-1:])
    assert full.finish_reason == "length" and last and full.text.endswith(last)
    cut = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=[last]))
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids
    assert cut.text == full.text[:full.text.index(last)]
