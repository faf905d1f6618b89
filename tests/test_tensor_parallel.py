"""Tensor parallelism on CPU (gloo, 2 processes): the same tokens and logprobs as one process, and workers
that start and end with the LLM. One tp=2 LLM per family, reused by the cases through a module fixture."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qwenvl import LLM, SamplingParams
from qwenvl.distributed.group import TensorParallelError
from qwenvl.distributed.shard import load_shard
from qwenvl.checkpoints.loader import load_model
from qwenvl.checkpoints.safetensors_reader import SafetensorsReader

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)


def image(seed: int, size=(84, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# Images of different sizes and a text-only request, batched: prefill chunks and decodes in one step.
CONVERSATIONS = [
    [{"role": "user", "content": [{"image": image(1)}, {"text": "What is in the picture?"}]}],
    [{"role": "user", "content": [{"image": image(2, (56, 84))}, {"text": "Describe it."}]}],
    [{"role": "user", "content": "Hello, who are you?"}],
]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                       # a zombie still answers kill(0): look at its state
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def children() -> set[int]:
    return {c.pid for c in multiprocessing.active_children()}


def assert_same_outputs(one, two):
    for a, b in zip(one, two):
        assert b.token_ids == a.token_ids
        chosen = [(la[t], lb[t]) for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids)]
        assert max(abs(x - y) for x, y in chosen) < 1e-4


# The MoE checkpoint in the Hub's layout: fused experts stored [E, in, out], sliced on E and transposed.
@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def pair(request, tiny_checkpoint):
    """(tp=1 LLM, tp=2 LLM) on the same tiny checkpoint; the tp=2 one is shut down after its family's tests."""
    ckpt = tiny_checkpoint(request.param, layout="flat" if request.param == "qwen3_vl_moe" else "current")
    tp = LLM(ckpt, dtype="float32", tensor_parallel_size=2)
    yield LLM(ckpt, dtype="float32"), tp
    tp.shutdown()


def test_batch_with_images_matches_one_process(pair):
    one, two = pair
    assert_same_outputs(one.generate(CONVERSATIONS, PARAMS), two.generate(CONVERSATIONS, PARAMS))


def test_second_turn_through_the_prefix_cache_matches_one_process(pair):
    one, two = pair
    first = CONVERSATIONS[0]
    turn2 = first + [{"role": "assistant", "content": "a cat"}, {"role": "user", "content": "And the colours?"}]
    two.chat(first, PARAMS)
    out = two.chat(turn2, PARAMS)
    assert out.cached_tokens > 0                      # the KV shards of rank 0 and the worker were both reused
    assert_same_outputs([one.chat(turn2, PARAMS)], [out])


def test_one_kv_head_replicated_tied_embeddings_odd_vocab_and_chunked_prefill(tmp_path_factory):
    """Fewer KV heads than ranks (each rank keeps the one it reads), a tied head, a vocabulary of odd size
    (ranks hold 208 and 207 rows), and a token budget that splits prompts (and their image rows) over steps."""
    from tiny import make_checkpoint
    ckpt = make_checkpoint(tmp_path_factory.mktemp("tp"), "qwen2_vl", name="kv1-tied-odd",
                           text_overrides=dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=415))
    small_steps = dict(max_num_batched_tokens=16, block_size=8)
    with LLM(ckpt, dtype="float32", tensor_parallel_size=2, **small_steps) as two:
        assert two.engine.cfg.text.tie_word_embeddings and two.engine.cfg.text.vocab_size == 415
        assert_same_outputs(LLM(ckpt, dtype="float32", **small_steps).generate(CONVERSATIONS, PARAMS),
                            two.generate(CONVERSATIONS, PARAMS))


def test_shutdown_ends_every_worker(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("qwen2_vl"), dtype="float32", tensor_parallel_size=2)
    pids = llm.engine.tp.worker_pids
    assert len(pids) == 1 and all(alive(p) for p in pids)
    llm.shutdown()
    llm.shutdown()                                     # idempotent
    assert not any(alive(p) for p in pids)
    assert not set(pids) & children()
    with pytest.raises(TensorParallelError, match="shut down"):
        llm.chat(CONVERSATIONS[2], PARAMS)


def test_a_dead_worker_fails_requests_with_a_clear_error_and_gc_reaps(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("qwen2_vl"), dtype="float32", tensor_parallel_size=2)
    pids = llm.engine.tp.worker_pids
    os.kill(pids[0], signal.SIGKILL)
    t = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1"):
        llm.generate(CONVERSATIONS, PARAMS)
    with pytest.raises(TensorParallelError, match="rank 1"):
        llm.chat(CONVERSATIONS[2], PARAMS)             # still a clear error, never a hang
    assert time.monotonic() - t < 30
    assert llm.stats()["kv_blocks_used"] == 0          # the failed requests gave their blocks back
    del llm
    gc.collect()
    assert not any(alive(p) for p in pids) and not set(pids) & children()


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel_size=3), "must divide num_attention_heads"),
    (dict(tensor_parallel_size=2, quantization="int8"), "not supported yet"),
    (dict(tensor_parallel_size=0), "positive integer"),
])
def test_unsupported_splits_are_refused_before_any_process_starts(tiny_checkpoint, options, message):
    before = children()
    with pytest.raises(ValueError, match=message):
        LLM(tiny_checkpoint("qwen2_vl"), dtype="float32", **options)
    assert children() == before


def test_a_worker_reads_only_its_slices_and_no_vision(tiny_checkpoint, monkeypatch):
    """Rank 1 of 2 (loading needs no collectives, so no second process here): every split tensor is read as a
    slice, only replicated ones (norm gains) whole, and each slice is the right part of the full tensor."""
    ckpt = tiny_checkpoint("qwen2_vl")
    whole = []
    read = SafetensorsReader.get_tensor
    monkeypatch.setattr(SafetensorsReader, "get_tensor", lambda self, key: whole.append(key) or read(self, key))
    shard, _ = load_shard(ckpt, SimpleNamespace(rank=1, world=2), torch.float32, torch.device("cpu"))
    assert whole and all(k.endswith("norm.weight") for k in whole), whole
    monkeypatch.undo()
    full = load_model(ckpt)[0].state_dict()
    got = shard.state_dict()
    assert not any(k.startswith("model.visual.") for k in got)       # rank 0 alone runs the vision tower
    attn = "model.language_model.layers.1.self_attn."
    mlp = "model.language_model.layers.1.mlp."
    # 4 query heads and 2 KV heads of 16 channels: rank 1 holds query heads 2-3 and KV head 1.
    assert torch.equal(got[attn + "q_proj.weight"], full[attn + "q_proj.weight"][32:64])
    assert torch.equal(got[attn + "q_proj.bias"], full[attn + "q_proj.bias"][32:64])
    assert torch.equal(got[attn + "k_proj.weight"], full[attn + "k_proj.weight"][16:32])
    assert torch.equal(got[attn + "o_proj.weight"], full[attn + "o_proj.weight"][:, 32:64])
    assert torch.equal(got[mlp + "up_proj.weight"], full[mlp + "up_proj.weight"][64:128])
    assert torch.equal(got[mlp + "down_proj.weight"], full[mlp + "down_proj.weight"][:, 64:128])
    assert torch.equal(got["lm_head.weight"], full["lm_head.weight"][207:414])
    assert torch.equal(got["model.language_model.embed_tokens.weight"],
                       full["model.language_model.embed_tokens.weight"][207:414])


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_slices_are_read_straight_from_the_file(tmp_path, dim):
    t = torch.arange(4 * 6 * 5, dtype=torch.float32).view(4, 6, 5)
    save_file({"w": t}, tmp_path / "x.safetensors")
    with SafetensorsReader(tmp_path / "x.safetensors") as sf:
        got = sf.get_slice("w", dim, 1, 3)
        assert torch.equal(got, t.narrow(dim, 1, 2))
        with pytest.raises(ValueError, match="cannot slice"):
            sf.get_slice("w", dim, 2, 9)


def test_serve_flag_reaches_the_engine_config(monkeypatch):
    from qwenvl.cli.main import build_parser
    from qwenvl.server import cli as server_cli

    seen = {}
    monkeypatch.setattr(server_cli, "serve", lambda settings, engine_options, **_: seen.update(engine_options) or 0)
    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2"])
    assert server_cli.run_serve_command(args) == 0
    assert seen["tensor_parallel_size"] == 2
