"""A tied int8 model keeps one copy of its token table: the embedding reads the head's tiles."""

from __future__ import annotations

import pytest
import torch

from qwenvl import LLM, SamplingParams, kernels
from qwenvl.checkpoints.loader import load_model
from qwenvl.checkpoints.quantize import LoadQuantizer, quantize_model
from qwenvl.layers.quantized_embedding import Int8Embedding, TiedInt8Embedding
from qwenvl.layers.quantized_linear import Int8Linear, quantize_int8


@pytest.mark.parametrize("layout", ["plain", "tiles"])
def test_int8_rows_read_from_either_layout_equal_the_dequantised_matrix(layout):
    w = torch.randn(150, 200, dtype=torch.bfloat16)            # 150 rows, 200 inputs: both padded in tiles
    layer = Int8Linear.from_int8(*quantize_int8(w), None)
    if layout == "tiles":
        layer.use_tile_layout()
        assert layer.layout == "tiles"
    ids = torch.tensor([[0, 15, 16, 149], [149, 100, 0, 7]])   # tile edges, the padded tile, repeats
    rows = layer.dequantized_rows(ids)
    assert rows.shape == (2, 4, 200) and rows.dtype == layer.scales.dtype
    assert torch.equal(rows, layer.dequantize()[ids])
    # a decode step's one id, none, and more than gather_rows picks one by one (its tensor-indexed path)
    for ids in (torch.tensor([37]), torch.tensor([], dtype=torch.long), torch.randint(0, 150, (40,))):
        assert torch.equal(layer.dequantized_rows(ids), layer.dequantize()[ids])


def test_a_tied_int8_model_embeds_from_its_heads_tiles_with_the_tables_values(tied_checkpoint):
    float_model, _ = load_model(tied_checkpoint, dtype="float32")
    table = float_model.model.language_model.embed_tokens.weight.detach().clone()
    expected = Int8Embedding.from_float(table)             # the table of its own this replaces
    ids = torch.cat([torch.arange(table.shape[0]), torch.tensor([5, 5, 0])]).view(-1, 3)
    streamed, _ = load_model(tied_checkpoint, dtype="float32", quantizer=LoadQuantizer("int8"))
    swapped = quantize_model(float_model, "int8")
    for model in (streamed, swapped):
        emb = model.model.language_model.embed_tokens
        if kernels.available():         # the head is in tiles: the table is its rows, not a second copy
            assert isinstance(emb, TiedInt8Embedding) and list(emb.buffers()) == []
            assert model.output_head.layout == "tiles"
            assert not any(k.startswith("model.language_model.embed_tokens") for k in model.state_dict())
        else:                           # the plain head shares the table's matrix already
            assert isinstance(emb, Int8Embedding)
        assert torch.equal(emb(ids), expected(ids))
        assert torch.equal(model.output_head.dequantize(), expected.dequantize())


def test_a_tied_int8_model_answers_through_the_engine(tied_checkpoint):
    llm = LLM(str(tied_checkpoint), quantization="int8", dtype="float32")
    out = llm.chat([{"role": "user", "content": "count to five"}],
                   SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 4
