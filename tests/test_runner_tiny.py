"""The paged engine loop on real tiny checkpoints: chunked prefill through images and video frames,
two requests sharing an image, a small KV pool; greedy tokens equal a plain ContiguousKVCache loop."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.encoder_cache import EncoderCache
from qwenvl.engine.runner import ModelRunner
from qwenvl.engine.scheduler import Scheduler
from qwenvl.engine.sequence import SamplingParams, Sequence
from qwenvl.inputs import PreprocessorConfig, build_inputs
from qwenvl.layers.attention import ContiguousKVCache
from qwenvl.layers.paged_attention import PagedKVPool
from qwenvl.checkpoints.loader import load_model
from qwenvl.tokenizer import Tokenizer

STEPS = 6


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _requests(family):
    cat, dog = _image(64, 56, 1), _image(56, 64, 2)
    msgs = [
        [{"role": "user", "content": [{"type": "image", "image": cat}, {"type": "text", "text": "Describe the cat."}]}],
        [{"role": "user", "content": [{"type": "image", "image": cat}, {"type": "text", "text": "What is red?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "The quick brown fox"}]}],
        [{"role": "user", "content": [{"type": "image", "image": dog}, {"type": "text", "text": "Where?"}]}],
    ]
    if family == "qwen3_vl":     # interleaved timestamp text between frames, DeepStack features
        frames = [_image(56, 56, 10 + i) for i in range(4)]
        msgs.append([{"role": "user", "content": [{"type": "video", "video": frames},
                                                  {"type": "text", "text": "How many people?"}]}])
    return msgs


def _reference(model, cfg, inputs):
    cache = ContiguousKVCache(cfg.text.num_hidden_layers)
    embeds, ds = None, []
    if inputs.vision:
        parts = [model.encode_vision(v.pixel_values, torch.tensor([v.grid_thw])) for v in inputs.vision]
        embeds = torch.cat([p[0] for p in parts])
        ds = [torch.cat(level) for level in zip(*[p[1] for p in parts])]
    h = model(torch.tensor(inputs.token_ids), inputs.positions, cache, embeds, ds)
    out, lps = [], []
    for i in range(STEPS):
        logits = model.compute_logits(h[-1:])
        out.append(int(logits.argmax(-1)))
        lps.append(float(torch.log_softmax(logits, -1)[0, out[-1]]))
        h = model(torch.tensor(out[-1:]), torch.full((3, 1), inputs.next_position + i), cache, None, [])
    return out, lps


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_engine_equals_contiguous_loop(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    tok, pre = Tokenizer.from_dir(path), PreprocessorConfig.from_dir(path)
    with torch.inference_mode():
        model, cfg = load_model(path)
        inputs = [build_inputs(m, tok, cfg, pre) for m in _requests(family)]
        ref = [_reference(model, cfg, x) for x in inputs]
        want = [r[0] for r in ref]
        t = cfg.text
        longest = max(len(x.token_ids) for x in inputs) + STEPS
        for num_blocks, budget in [(256, 4096), (-(-longest // 4) + 2, 24)]:
            bm = BlockManager(num_blocks, 4)
            enc = EncoderCache(4096)
            sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget, is_encoder_cached=enc.__contains__)
            pool = PagedKVPool(t.num_hidden_layers, num_blocks, 4, t.num_key_value_heads, t.head_dim, torch.float32)
            runner = ModelRunner(model, pool, encoder_cache=enc)
            params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=1)
            seqs = [Sequence(f"r{i}", x.token_ids, params, x.positions, x.next_position, x.vision)
                    for i, x in enumerate(inputs)]
            for s in seqs:
                sched.add(s)
            while sched.has_unfinished():
                out = sched.schedule()
                sched.postprocess(out, *runner.step(out.chunks))
            assert [s.output_token_ids for s in seqs] == want, (num_blocks, budget)
            got_lp = [[lp[t] for lp, t in zip(s.output_logprobs, s.output_token_ids)] for s in seqs]
            np.testing.assert_allclose(got_lp, [r[1] for r in ref], atol=1e-4)
            if num_blocks < 256:
                assert sched.num_preemptions > 0 and bm.prefix_cache_hit_tokens > 0
            assert bm.num_used_blocks == 0
            assert runner.num_encoded_items <= len({v.content_hash for x in inputs for v in x.vision}) + \
                sched.num_preemptions
