"""MoE experts quantise per expert (int8 / int4 through the shared kernels); the router stays float."""

import pytest
import torch

from qwenvl import LLM, SamplingParams
from qwenvl.layers.moe import Experts
from qwenvl.layers.quantized_linear import Int4Linear, Int8Linear
from qwenvl.layers.quantized_moe import QuantizedExperts
from qwenvl.checkpoints.loader import load_model
from quant_helpers import streamed_equals_swapped, tiny_logits


@pytest.mark.parametrize("layout", ["current", "flat"])
@pytest.mark.parametrize("mode,kind,tol", [("int8", Int8Linear, 0.04), ("int4", Int4Linear, 0.30)])
def test_streamed_quantisation_of_experts(tiny_checkpoint, layout, mode, kind, tol):
    path = tiny_checkpoint("qwen3_vl_moe", layout=layout)
    ref, _ = load_model(path, dtype="float32")
    streamed = streamed_equals_swapped(path, mode)
    experts = [m for m in streamed.modules() if isinstance(m, (Experts, QuantizedExperts))]
    assert experts and all(isinstance(m, QuantizedExperts) for m in experts)
    assert all(isinstance(lin, kind) for m in experts for lin in list(m.gate_up) + list(m.down))
    routers = [m for n, m in streamed.named_modules() if n.endswith(".mlp.gate")]
    assert routers and all(type(r) is torch.nn.Linear for r in routers)
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0))
    x, y = tiny_logits(ref, ids), tiny_logits(streamed, ids)
    assert (x - y).norm() / x.norm() < tol


def test_int4_moe_chats_through_the_engine(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("qwen3_vl_moe"), dtype="float32", quantization="int4")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    alone = [llm.chat(c, params).token_ids for c in convs]
    assert [o.token_ids for o in llm.generate(convs, params)] == alone
    assert all(len(t) == 8 for t in alone)


def test_int4_experts_are_loaded_side_by_side_with_the_same_bytes(tiny_checkpoint, monkeypatch):
    """The loader's last step puts each MoE layer's int4 experts (packed weights, then group parameters) side by
    side in one buffer (2 MiB pages where Linux gives them): the same bytes as without that step, and the same
    logits."""
    from qwenvl.checkpoints import loader
    from qwenvl.checkpoints.quantize import LoadQuantizer
    path = tiny_checkpoint("qwen3_vl_moe")
    model, _ = load_model(path, dtype="bfloat16", quantizer=LoadQuantizer("int4"), fuse=True)
    monkeypatch.setattr(loader, "gather_expert_weights", lambda model, after_each: 0)
    apart, _ = load_model(path, dtype="bfloat16", quantizer=LoadQuantizer("int4"), fuse=True)
    moe = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    moe_apart = [m for m in apart.modules() if isinstance(m, QuantizedExperts)]
    assert moe and len(moe) == len(moe_apart)
    for gathered, plain in zip(moe, moe_apart):
        for name in ("gate_up", "down"):
            layers, plain_layers = getattr(gathered, name), getattr(plain, name)
            for tensor in ("packed", "group_params"):
                storages = {getattr(layer, tensor).untyped_storage().data_ptr() for layer in layers}
                assert len(storages) == 1                                   # one buffer for all experts
                assert len({getattr(layer, tensor).untyped_storage().data_ptr() for layer in plain_layers}) > 1
                for a, b in zip(layers, plain_layers):
                    assert torch.equal(getattr(a, tensor), getattr(b, tensor))
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiny_logits(model, ids), tiny_logits(apart, ids))
