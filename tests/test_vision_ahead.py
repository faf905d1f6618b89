"""Images encoded ahead, a slice of the vision tower per step (issue 37), on real tiny checkpoints in float32:
  * a tower's `stages` generator returns encode_vision's result bit for bit, however its blocks are spread;
  * in the engine loop, each image's cached features equal encoding it alone (one by one), bit for bit;
  * a step that decodes runs one slice (here one block), so the running request gets a token every step while
    the image is encoded; the greedy tokens equal the plain contiguous loop's (chunked == unchunked), also
    with the prefill cap; KV blocks all come back."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.checkpoints.loader import load_model
from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.encoder_cache import EncoderCache
from qwenvl.engine.runner import ModelRunner
from qwenvl.engine.scheduler import Scheduler
from qwenvl.engine.sequence import SamplingParams, Sequence
from qwenvl.inputs import PreprocessorConfig, build_inputs
from qwenvl.layers.paged_attention import PagedKVPool
from qwenvl.models.common import run_stages
from qwenvl.tokenizer import Tokenizer
from test_runner_tiny import STEPS, _reference

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _messages():
    a, b = _image(112, 84, 1), _image(84, 140, 2)
    return [
        [{"role": "user", "content": [{"type": "text", "text": "Count to ten, please, slowly and clearly."}]}],
        [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": b}, {"type": "image", "image": a},
                                      {"type": "text", "text": "Compare."}]}],
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param)
    tok, pre = Tokenizer.from_dir(path), PreprocessorConfig.from_dir(path)
    with torch.inference_mode():
        model, cfg = load_model(path, dtype=torch.float32)
        inputs = [build_inputs(m, tok, cfg, pre) for m in _messages()]
    return model, cfg, inputs


def test_stages_equal_encode_vision_bit_for_bit(tiny):
    model, cfg, inputs = tiny
    items = [v for x in inputs for v in x.vision]
    with torch.inference_mode():
        for it in items:
            grid = torch.tensor([it.grid_thw])
            whole = model.encode_vision(it.pixel_values, grid)
            stages = model.encode_vision_stages(it.pixel_values, grid)
            rows = []
            other = model.encode_vision_stages(items[0].pixel_values, torch.tensor([items[0].grid_thw]))
            while True:                          # another tower run interleaved, block by block
                try:
                    rows.append(next(stages))
                except StopIteration as done:
                    sliced = done.value
                    break
                next(other, None)
            assert rows == [it.pixel_values.shape[0]] * cfg.vision.depth
            assert torch.equal(sliced[0], whole[0])
            assert len(sliced[1]) == len(whole[1]) and all(torch.equal(a, b) for a, b in zip(sliced[1], whole[1]))
            again = run_stages(model.encode_vision_stages(it.pixel_values, grid))
            assert torch.equal(again[0], whole[0])


class _CountingModel:
    """The model, with each tower slice noted against the engine step it ran in."""

    def __init__(self, model):
        self.model, self.step, self.slices = model, 0, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_vision_stages(self, pixels, grid):
        stages = self.model.encode_vision_stages(pixels, grid)
        while True:
            try:
                rows = next(stages)
            except StopIteration as done:
                return done.value
            self.slices.append(self.step)
            yield rows


@pytest.mark.parametrize("prefill_cap", [None, 5])
def test_engine_encodes_ahead_a_block_per_decode_step_with_the_same_tokens(tiny, prefill_cap):
    model, cfg, inputs = tiny
    t = cfg.text
    with torch.inference_mode():
        want = [_reference(model, cfg, x)[0] for x in inputs]
        alone = {v.content_hash: model.encode_vision(v.pixel_values, torch.tensor([v.grid_thw]))
                 for x in inputs for v in x.vision}
    counting = _CountingModel(model)
    bm = BlockManager(256, 4)
    enc = EncoderCache(4096)
    pool = PagedKVPool(t.num_hidden_layers, 256, 4, t.num_key_value_heads, t.head_dim, torch.float32)
    rows_per_block = min(v.pixel_values.shape[0] for x in inputs for v in x.vision)   # any block fills it
    runner = ModelRunner(counting, pool, encoder_cache=enc, vision_rows_per_step=rows_per_block)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4096, is_encoder_cached=runner.has_features,
                      encode_ahead=True, max_prefill_tokens_while_decoding=prefill_cap)
    params = SamplingParams(temperature=0, max_tokens=STEPS + 12, ignore_eos=True)
    seqs = [Sequence(f"r{i}", x.token_ids, params if i == 0 else SamplingParams(
        temperature=0, max_tokens=STEPS, ignore_eos=True), x.positions, x.next_position, x.vision)
        for i, x in enumerate(inputs)]
    sched.add(seqs[0])
    decoding_steps = []
    while sched.has_unfinished():
        counting.step += 1
        if counting.step == 3:                   # the image requests arrive while r0 decodes
            sched.add(seqs[1])
            sched.add(seqs[2])
        out = sched.schedule()
        if any(c.seq is seqs[0] and not c.is_prefill for c in out.chunks):
            decoding_steps.append(counting.step)
        sched.postprocess(out, *runner.step(out.chunks, out.encode))
    assert [s.output_token_ids[:STEPS] for s in seqs] == want
    assert bm.num_used_blocks == 0 and runner.num_encoded_items == len(alone)
    for h, (emb, ds) in alone.items():             # one by one, bit for bit
        got = enc.get(h)
        assert torch.equal(got[0], emb) and all(torch.equal(a, b) for a, b in zip(got[1], ds))
    # while r0 decoded, every step ran exactly one block: r0 got a token in each of them
    during = [s for s in counting.slices if s in decoding_steps]
    assert len(during) == len(set(during)) >= cfg.vision.depth
    assert set(range(decoding_steps[0], decoding_steps[-1] + 1)) == set(decoding_steps)


def test_llm_with_the_latency_options_answers_as_without():
    """The bundled model through LLM.generate (the engine's own wiring of both options): the same greedy
    tokens as the defaults, every KV block back."""
    from qwenvl import LLM
    convs = [m for m in _messages()] + [[{"role": "user", "content": [
        {"type": "image", "image": _image(300, 200, 5)}, {"type": "text", "text": "Describe the image."}]}]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(dtype="float32")
    ahead = LLM(dtype="float32", vision_rows_per_step=64, max_prefill_tokens_while_decoding=16)
    assert [o.token_ids for o in ahead.generate(convs, params)] == [o.token_ids for o in plain.generate(convs, params)]
    assert ahead.stats()["kv_blocks_used"] == 0 and ahead.engine.runner.num_encoded_items == 3
