"""Qwen3-VL-MoE end to end against transformers' Qwen3VLMoeForConditionalGeneration, in both file layouts.

The "current" checkpoint is what transformers 5.x writes (`num_local_experts`, experts [E, out, in]); the
"flat" one is the Hub's (`num_experts`, experts [E, in, out]) with the same weights. Our engine runs the
conversation greedily through LLM.chat; transformers generates from the same token ids and pixels (the
ones our input pipeline produced), so the model code and the MoE compute are what is compared.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from qwenvl import LLM, SamplingParams  # noqa: E402
from tiny import load_hf_model  # noqa: E402

STEPS = 12


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


CONVERSATIONS = {
    "one image": [{"role": "user", "content": [{"image": _image(96, 64, 1)}, {"text": "What is this?"}]}],
    "two images": [{"role": "user", "content": [{"image": _image(96, 64, 2)}, {"image": _image(64, 128, 3)},
                                                {"text": "Compare them."}]}],
    "two turns": [
        {"role": "user", "content": [{"image": _image(64, 64, 4)}, {"text": "Describe it."}]},
        {"role": "assistant", "content": "A square of noise."},
        {"role": "user", "content": "And the colours?"},
    ],
}


@pytest.fixture(scope="module")
def moe_pair(tiny_checkpoint):
    current, hub = tiny_checkpoint("qwen3_vl_moe"), tiny_checkpoint("qwen3_vl_moe", layout="flat")
    return current, hub, load_hf_model(current)


def _reference(hf, prompt) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt.token_ids])
    kwargs = {}
    if prompt.vision:
        kwargs["pixel_values"] = torch.cat([v.pixel_values for v in prompt.vision])
        kwargs["image_grid_thw"] = torch.tensor([v.grid_thw for v in prompt.vision])
    image_id = hf.config.image_token_id
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=(ids == image_id).int(), **kwargs, max_new_tokens=STEPS,
                          do_sample=False, eos_token_id=[], pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, new)]
    return new, logps


@pytest.mark.parametrize("layout", ["current", "flat"])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_greedy_parity(moe_pair, layout, case):
    current, hub, hf = moe_pair
    llm = LLM(current if layout == "current" else hub, dtype="float32", device="cpu")
    messages = CONVERSATIONS[case]
    want_ids, want_logps = _reference(hf, llm.engine.prepare(messages))
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=0))
    assert out.token_ids == want_ids
    got_logps = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
    assert all(math.isclose(g, w, abs_tol=1e-3) for g, w in zip(got_logps, want_logps)), (got_logps, want_logps)


def test_layouts_are_read_from_the_config(moe_pair):
    from qwenvl.models.registry import config_from_dir
    current, hub, _ = moe_pair
    assert not config_from_dir(current).text.experts_stored_in_out
    assert config_from_dir(hub).text.experts_stored_in_out


def test_batched_equals_alone(moe_pair):
    current, _, _ = moe_pair
    llm = LLM(current, dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    convs = list(CONVERSATIONS.values())
    alone = [llm.chat(c, params).token_ids for c in convs]
    together = [o.token_ids for o in llm.generate(convs, params)]
    assert together == alone


def test_strict_loader_refuses_a_missing_expert_tensor(moe_pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qwenvl.checkpoints.loader import LoadError, load_model
    current, _, _ = moe_pair
    broken = tmp_path / "broken"
    shutil.copytree(current, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.language_model.layers.0.mlp.experts.down_proj"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match="experts.down_proj"):
        load_model(broken)
