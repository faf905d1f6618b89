"""GGUF checkpoints (issue 39): files made by llama.cpp's own converter from tiny random checkpoints (and the
bundled model), loaded by qwenvl and compared with the original folders.

Float files must give the folder's greedy ids and logprobs (float32, within 1e-3), tokenizer ids and
chat-template text; quantised files must give gguf's own dequantisation of every int4 weight (to float32
rounding), and logits within the tolerance derived in `test_quantised_logits`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gguf_files import convert, dequantised_copy, rewrite
from safetensors.torch import load_file, save_file

from qwenvl import LLM, SamplingParams
from qwenvl.checkpoints.checkpoint_keys import legacy_key
from qwenvl.checkpoints.gguf import GGUFError, open_pair
from qwenvl.checkpoints.gguf.loader import load_gguf_model
from qwenvl import kernels
from qwenvl.kernels import int4_layout
from qwenvl.layers.quantized_linear import LAYOUT_TILES, Int4Linear, Int8Linear
from qwenvl.tokenizer import Tokenizer
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "qwenvl" / "assets" / "bundled"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
KV = dict(num_kv_blocks=96)
CORPUS = ["Describe this image. The cat sits on the red mat.", "图表显示销售额从二零一九年到二零二四年持续增长。",
          "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is 12,345.6?<|im_end|>\n",
          "  leading spaces\tand\ttabs\n\nnew lines 🙂 émoji, ÀÉÎ, naïve café", "<tool_call>{\"x\": 1}</tool_call>",
          "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(12,34),(56,78)<|box_end|>"]


class _Converted(dict):
    """family -> (checkpoint folder, LM GGUF, mmproj GGUF), F32, by the real converter; made on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> tuple[Path, Path, Path]:
        # The converter maps the merger's mlp.{i} only for i below the vision depth: Qwen2-VL's tiny tower needs 3.
        # It reads MoE experts in the Hub's [E, in, out] files ("flat") and has no dense layers among them.
        moe = family == "qwen3_vl_moe"
        folder = make_checkpoint(self.root, family, layout="flat" if moe else "current",
                                 text_overrides={"mlp_only_layers": []} if moe else None,
                                 vision_overrides={"depth": 3} if family == "qwen2_vl" else None)
        _hub_eos(folder)
        self[family] = (folder, *convert(folder, self.root))
        return self[family]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> _Converted:
    return _Converted(tmp_path_factory.mktemp("gguf"))


def _hub_eos(folder: Path) -> None:
    """generation_config.json ending on <|im_end|> and <|endoftext|>, as the Hub's Qwen-VL files do (and as
    llama.cpp does for a GGUF)."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text())
    gen["eos_token_id"] = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    path.write_text(json.dumps(gen))


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _conversations(family: str) -> dict[str, list[dict]]:
    # Qwen3-VL's released budget starts at 65536 pixels (the GGUF's default); the tiny folder's at 4096.
    size = (256, 256) if family.startswith("qwen3") else (112, 84)
    a, b = _image(1, size), _image(2, size)
    return {
        "image": [{"role": "user", "content": [{"image": a}, {"text": "Describe this image."}]}],
        "two images": [{"role": "user", "content": [{"image": a}, {"image": b}, {"text": "这两张图有什么不同？"}]}],
        "two turns": [{"role": "user", "content": [{"image": a}, {"text": "What is it?"}]},
                      {"role": "assistant", "content": "A cat on the mat."},
                      {"role": "user", "content": "And the colour?"}],
    }


def _assert_same_answers(ref: LLM, got: LLM, conversations: dict, tol: float = 1e-3) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
    for name, messages in conversations.items():
        want, have = ref.chat(messages, params), got.chat(messages, params)
        assert have.token_ids == want.token_ids, name
        assert have.text == want.text, name
        for step, (w, h) in enumerate(zip(want.logprobs, have.logprobs)):
            for token in w.keys() & h.keys():
                assert abs(w[token] - h[token]) <= tol, (name, step, token, w[token], h[token])


@pytest.mark.parametrize("family", [pytest.param("qwen2_vl", marks=pytest.mark.slow), "qwen2_5_vl",
                                    pytest.param("qwen3_vl", marks=pytest.mark.slow),
                                    pytest.param("qwen3_vl_moe", marks=pytest.mark.slow)])
def test_float_gguf_answers_as_the_folder(converted, family):
    folder, lm, mmproj = converted[family]
    ref = LLM(folder, dtype="float32", **KV)
    got = LLM(lm, mmproj=mmproj, dtype="float32", **KV)
    assert got.family == family
    without_eos = lambda cfg: dataclasses.replace(cfg, eos_token_ids=())     # the GGUF adds <|endoftext|>
    assert without_eos(got.engine.cfg) == without_eos(ref.engine.cfg)
    _assert_same_answers(ref, got, _conversations(family))


def test_a_folder_with_both_files_loads(converted, tmp_path):
    folder, lm, mmproj = converted["qwen2_5_vl"]
    both = tmp_path / "both"
    both.mkdir()
    for f in (lm, mmproj):
        (both / f.name).symlink_to(f)
    got = LLM(both, dtype="float32", **KV)
    _assert_same_answers(LLM(folder, dtype="float32", **KV), got,
                         {"image": _conversations("qwen2_5_vl")["image"]})


def test_tokenizer_and_chat_template_are_the_folders(converted):
    folder, lm, mmproj = converted["qwen2_5_vl"]
    ref = Tokenizer.from_dir(folder)
    got = Tokenizer.from_gguf(load_gguf_model(open_pair(lm, mmproj), torch.float32, torch.device("cpu"))[2])
    for text in CORPUS:
        assert got.encode(text) == ref.encode(text), text
        assert got.decode(ref.encode(text)) == ref.decode(ref.encode(text)), text
    assert got.chat_template == ref.chat_template
    for messages in _conversations("qwen2_5_vl").values():
        plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                  [{"type": "image"} if "image" in p else {"type": "text", "text": p["text"]} for p in m["content"]]}
                 for m in messages]
        assert got.apply_chat_template(plain) == ref.apply_chat_template(plain)
    assert set(ref.eos_token_ids) <= set(got.eos_token_ids)


@pytest.mark.slow
def test_bundled_model_as_bf16_gguf_grounds_the_same(tmp_path):
    """The bundled (trained) model converted to BF16 with tied embeddings: same answer, same boxes."""
    # The Hub's key naming (visual.*, model.*): this converter skips a tower saved as model.visual.*.
    hub = tmp_path / "bundled"
    shutil.copytree(BUNDLED, hub)
    tensors = load_file(hub / "model.safetensors")
    save_file({legacy_key(k): v for k, v in tensors.items()}, hub / "model.safetensors", metadata={"format": "pt"})
    lm, mmproj = convert(hub, tmp_path, "bf16")
    # Its pixel budget is its own (max 160000), not Qwen2-VL's released one: placed beside the files, it wins.
    shutil.copy(BUNDLED / "preprocessor_config.json", tmp_path)
    ref, got = LLM(dtype="float32", **KV), LLM(lm, mmproj=mmproj, dtype="float32", **KV)
    assert got.engine.cfg.text.tie_word_embeddings
    image = Image.open(ROOT / "examples" / "shapes.png")
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Locate the red triangle."}]}]
    params = SamplingParams(temperature=0.0, max_tokens=48, logprobs=1)
    want, have = ref.chat(messages, params), got.chat(messages, params)
    assert want.boxes, want.text                # the bundled model does ground: the comparison means something
    assert have.token_ids == want.token_ids and have.boxes == want.boxes


# ------------------------------------------------------------------------------------------- quantised
@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A Qwen2.5-VL whose LM rows are 256 wide (a Q4_K super-block), converted to F32."""
    root = tmp_path_factory.mktemp("gguf-wide")
    folder = make_checkpoint(root, "qwen2_5_vl", name="wide",
                             text_overrides=dict(hidden_size=256, intermediate_size=512, num_attention_heads=16,
                                                 num_key_value_heads=4),
                             vision_overrides=dict(out_hidden_size=256))
    _hub_eos(folder)
    return (folder, *convert(folder, root))


def _q4_k_m_like(name: str, shape: tuple) -> str | None:
    """Per-tensor types as a Q4_K_M file mixes them: Q4_K mostly, the attention values of layer 0 in Q8_0,
    its MLP down projection and the output head in Q6_K (llama.cpp's choice), layer 1's down in Q5_0 (any
    other type)."""
    if len(shape) != 2:
        return None
    if name == "blk.0.attn_v.weight":
        return "Q8_0"
    if name in ("blk.0.ffn_down.weight", "output.weight"):
        return "Q6_K"
    if name == "blk.1.ffn_down.weight":
        return "Q5_0"
    return "Q4_K"


def _int4_reference_rows(t) -> np.ndarray:
    from gguf.quants import dequantize
    return dequantize(np.asarray(t.data), t.tensor_type)


def _within_half_int8_row_step(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """int8 per row: one scale per row instead of one per 32 weights, so within half a row step."""
    half_step = ref.abs().amax(dim=-1, keepdim=True) / 127 / 2
    return bool(((got - ref).abs() <= half_step * 1.001 + 1e-8).all())


def _within_half_int4_group_step(got: torch.Tensor, ref: torch.Tensor, group: int = 32) -> bool:
    """int4 requantised in groups: within half of each group's step, (max(hi, 0) - min(lo, 0)) / 15."""
    g = ref.reshape(*ref.shape[:-1], -1, group)
    step = (g.amax(dim=-1).clamp(min=0) - g.amin(dim=-1).clamp(max=0)) / 15
    err = (got - ref).abs().reshape(g.shape)
    return bool((err <= step[..., None] / 2 * 1.001 + 1e-7).all())


def test_quantised_layers_follow_each_tensor_type(wide, tmp_path):
    folder, lm, mmproj = wide
    q = rewrite(lm, tmp_path / "q4_k_m.gguf", _q4_k_m_like)
    pair = open_pair(q, mmproj)
    model = load_gguf_model(pair, torch.float32, torch.device("cpu"))[0]
    tensors = {t.name: t for t in pair.lm.tensors}
    ref = lambda name: torch.from_numpy(_int4_reference_rows(tensors[name]))
    layers = model.model.language_model.layers
    # int4 types: gguf's dequantisation of the same blocks
    for name, module in (("blk.0.attn_q.weight", layers[0].self_attn.q_proj), ("blk.1.ffn_up.weight",
                         layers[1].mlp.up_proj)):
        assert isinstance(module, Int4Linear) and module.group_size == 32
        if module.layout == LAYOUT_TILES:       # Q4_K's super-blocks kept as they are: bit for bit gguf's values
            assert module.super_blocks, name
            assert torch.equal(module.dequantize(), ref(name)), name
        else:                                   # PyTorch's int4pack: offset = min + 8 * scale, one more rounding
            assert torch.allclose(module.dequantize(), ref(name), rtol=0, atol=4e-7 * ref(name).abs().max()), name
    emb = model.model.language_model.embed_tokens
    ids = torch.tensor([0, 5, 401])
    assert torch.allclose(emb(ids), ref("token_embd.weight")[ids], rtol=0,
                          atol=4e-7 * ref("token_embd.weight").abs().max().item())
    # a mostly-4-bit file: its Q8_0 / Q6_K / Q5_0 tensors become int4 in int4's own groups
    for name, module in (("blk.0.attn_v.weight", layers[0].self_attn.v_proj), ("output.weight", model.lm_head),
                         ("blk.0.ffn_down.weight", layers[0].mlp.down_proj),
                         ("blk.1.ffn_down.weight", layers[1].mlp.down_proj)):
        assert isinstance(module, Int4Linear), name
        assert _within_half_int4_group_step(module.dequantize(), ref(name), module.group_size), name
    # an 8-bit file: int8 per row
    q8 = rewrite(lm, tmp_path / "q8_0.gguf", lambda n, s: "Q8_0" if len(s) == 2 else None)
    pair = open_pair(q8, mmproj)
    model = load_gguf_model(pair, torch.float32, torch.device("cpu"))[0]
    tensors = {t.name: t for t in pair.lm.tensors}
    for name, module in (("blk.0.attn_v.weight", model.model.language_model.layers[0].self_attn.v_proj),
                         ("output.weight", model.lm_head)):
        assert isinstance(module, Int8Linear) and _within_half_int8_row_step(module.dequantize(), ref(name)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q6_k_requantised_in_cpp_as_the_python_path(wide, tmp_path, monkeypatch, dtype):
    """A Q4_K_M-like file's Q6_K tensors (head, one down projection) go straight from their blocks into int4
    tiles (csrc/q6_k.cpp): the layers hold the bytes the Python path gives (gguf's values in the model's dtype
    through Int4Linear.from_weight), so the logits are identical; with QWENVL_KERNELS=off the same file loads
    through gguf's numpy values into PyTorch's int4pack layout, the same weights up to its offset rounding."""
    from quant_helpers import tiny_logits
    if not kernels.available():
        pytest.skip("the tile layout needs qwenvl's kernels")
    folder, lm, mmproj = wide
    q = rewrite(lm, tmp_path / "q4_k_m.gguf", _q4_k_m_like)
    pair = open_pair(q, mmproj)
    model = load_gguf_model(pair, dtype, torch.device("cpu"))[0]
    tensors = {t.name: t for t in pair.lm.tensors}
    layers = model.model.language_model.layers
    q6k = (("output.weight", model.lm_head), ("blk.0.ffn_down.weight", layers[0].mlp.down_proj))
    for name, module in q6k:
        assert tensors[name].tensor_type.name == "Q6_K"
        values = torch.from_numpy(_int4_reference_rows(tensors[name])).to(dtype)
        ref = Int4Linear.from_weight(values, module.group_size, None, layout=LAYOUT_TILES)
        assert module.layout == LAYOUT_TILES and not module.super_blocks, name
        assert torch.equal(module.packed, ref.packed), name
        assert torch.equal(module.group_params.view(torch.uint8), ref.group_params.view(torch.uint8)), name
    ids = torch.tensor([3, 17, 60, 101])
    want = tiny_logits(model, ids)
    for name, module in q6k:         # the Python path's layers in their place: the same logits, bit for bit
        values = torch.from_numpy(_int4_reference_rows(tensors[name])).to(dtype)
        module.load_state_dict(Int4Linear.from_weight(values, module.group_size, None,
                                                      layout=LAYOUT_TILES).state_dict(), strict=False)
    assert torch.equal(tiny_logits(model, ids), want)
    monkeypatch.setenv(kernels.MODE_ENV, "off")
    plain = load_gguf_model(open_pair(q, mmproj), dtype, torch.device("cpu"))[0]
    for name, module in (("output.weight", plain.lm_head),
                         ("blk.0.ffn_down.weight", plain.model.language_model.layers[0].mlp.down_proj)):
        mine = dict(q6k)[name]
        assert module.layout != LAYOUT_TILES and module.group_size == mine.group_size, name
        # the same codes and scales; int4pack keeps offset = 8 * scale + min in the model's dtype and dequantises
        # in it: at most (8 + 8 + 15) s eps there ((q - 8) s, the offset, the sum) and (15 + 15) s eps in the
        # tiles (the min, the result), |w| <= 15 s, eps the dtype's unit roundoff: under 64 s eps
        eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
        scales = int4_layout.unpack_params(mine.group_params)[0][:mine.out_features].float()
        bound = (64 * eps * scales).repeat_interleave(mine.group_size, dim=1)
        assert ((module.dequantize().float() - mine.dequantize().float()).abs() <= bound + 1e-30).all(), name


def _float32_form(layer: Int4Linear) -> Int4Linear:
    """The same Q4_K layer with its scales and mins as float32 per group of 32 (the form before super-blocks)."""
    n, k = layer.out_features, layer.in_features
    scales, mins = int4_layout.unpack_params(layer.group_params)
    q = int4_layout.unpack(layer.packed, k)[:n]
    return Int4Linear.from_scales_and_mins(q, scales[:n], mins[:n], 32, layer.bias, layout=LAYOUT_TILES,
                                           dtype=layer.weight_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q4_k_keeps_its_super_blocks_in_any_model_dtype(wide, tmp_path, dtype):
    """Q4_K tensors load as super-blocks (d, dmin, sc, m as in the file) whatever the model's dtype: the
    weights are gguf's dequantisation to the bit (a bfloat16 model no longer rounds its scales), and the
    model's logits are the float32 group form's exactly (the kernel forms the same float32 values)."""
    from quant_helpers import tiny_logits
    if not kernels.available():
        pytest.skip("the tile layout needs qwenvl's kernels")
    folder, lm, mmproj = wide
    q = rewrite(lm, tmp_path / "q4_k.gguf", lambda n, s: "Q4_K" if len(s) == 2 else None)
    pair = open_pair(q, mmproj)
    model = load_gguf_model(pair, dtype, torch.device("cpu"))[0]
    tensors = {t.name: t for t in pair.lm.tensors}
    layers = model.model.language_model.layers
    checked = 0
    for i, layer in enumerate(layers):
        for name, module in ((f"blk.{i}.ffn_down.weight", layer.mlp.down_proj),
                             (f"blk.{i}.attn_output.weight", layer.self_attn.o_proj)):
            assert isinstance(module, Int4Linear) and module.super_blocks, name
            w = int4_layout.dequantize(module.packed, module.group_params, module.in_features, 32, torch.float32)
            assert torch.equal(w[:module.out_features], torch.from_numpy(_int4_reference_rows(tensors[name]))), name
            checked += 1
    assert checked == 2 * len(layers)
    ids = torch.tensor([3, 17, 60, 101])
    want = tiny_logits(model, ids)
    for parent in layers.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Int4Linear) and child.super_blocks:
                setattr(parent, child_name, _float32_form(child))
    assert not any(isinstance(m, Int4Linear) and m.super_blocks for m in layers.modules())
    assert torch.equal(tiny_logits(model, ids), want)


@pytest.mark.slow
def test_quantised_expert_stacks(converted, tmp_path):
    """Qwen3-VL-MoE: each expert becomes its own int4 layer (gate and up side by side) from Q4_0 stacks, with
    gguf's dequantisation of its blocks; the Q8_0 down stacks of this mostly-4-bit file are requantised to
    int4."""
    from gguf.quants import dequantize
    from qwenvl.layers.quantized_moe import QuantizedExperts
    folder, lm, mmproj = converted["qwen3_vl_moe"]
    q = rewrite(lm, tmp_path / "moe-q.gguf",
                lambda n, s: "Q4_0" if "_exps" in n and "down" not in n else "Q8_0" if "down_exps" in n else None)
    pair = open_pair(q, mmproj)
    model = load_gguf_model(pair, torch.float32, torch.device("cpu"))[0]
    tensors = {t.name: t for t in pair.lm.tensors}
    experts = model.model.language_model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts) and isinstance(experts.gate_up[0], Int4Linear)
    ref = lambda name: torch.from_numpy(dequantize(np.asarray(tensors[name].data), tensors[name].tensor_type))
    gate_up = torch.cat([ref("blk.0.ffn_gate_exps.weight"), ref("blk.0.ffn_up_exps.weight")], dim=1)
    down = ref("blk.0.ffn_down_exps.weight")
    for e in range(experts.num_experts):
        assert torch.allclose(experts.gate_up[e].dequantize(), gate_up[e], rtol=0, atol=4e-7 * gate_up.abs().max())
        assert _within_half_int4_group_step(experts.down[e].dequantize(), down[e], experts.down[e].group_size)
    out = LLM(q, mmproj=mmproj, dtype="float32", **KV).chat(_conversations("qwen3_vl_moe")["image"],
                                                             SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out.token_ids) == 4


def _first_step_logprobs(llm: LLM, messages) -> dict[int, float]:
    return llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=1, logprobs=20)).logprobs[0]


@pytest.mark.slow
def test_quantised_logits(wide, tmp_path):
    """Tolerance, derived: int4 types go in with their own codes, so against gguf's dequantised weights only
    float32 rounding differs (1e-3 in logprobs is generous). In the Q8_0 file every matrix is requantised per
    row: one int8 step per row instead of one per 32 weights, i.e. the step of the row's largest block where
    Q8_0 has each block's own (for Gaussian rows about 1.3x larger on average), so the error this adds is of
    the order of the file's own quantisation error: bounded by twice the distance between the dequantised
    reference and the original float model (measured here: 0.040 against the file's own 0.044). In the
    Q4_K_M-like file its few 5-, 6- and 8-bit tensors are requantised to int4 (qwenvl's own int4 groups), adding
    an error of the order of the file's own 4-bit one: the same bound holds."""
    folder, lm, mmproj = wide
    messages = _conversations("qwen2_5_vl")["image"]
    original = _first_step_logprobs(LLM(lm, mmproj=mmproj, dtype="float32", **KV), messages)
    for name, type_for in (("q4_k", lambda n, s: "Q4_K" if len(s) == 2 else None),
                           ("q4_0", lambda n, s: "Q4_0" if len(s) == 2 else None),
                           ("q4_k_m", _q4_k_m_like), ("q8_0", lambda n, s: "Q8_0" if len(s) == 2 else None)):
        q = rewrite(lm, tmp_path / f"{name}.gguf", type_for)
        ref = _first_step_logprobs(LLM(dequantised_copy(q, tmp_path / f"{name}-ref.gguf"), mmproj=mmproj,
                                       dtype="float32", **KV), messages)
        got = _first_step_logprobs(LLM(q, mmproj=mmproj, dtype="float32", **KV), messages)
        shared = ref.keys() & got.keys() & original.keys()
        ours = max(abs(got[t] - ref[t]) for t in shared)
        theirs = max(abs(ref[t] - original[t]) for t in shared)
        limit = 1e-3 if name in ("q4_k", "q4_0") else 2 * theirs
        assert ours <= limit, (name, ours, theirs)


# ------------------------------------------------------------------------------------------- bad files
@pytest.mark.slow
def test_bad_files_are_named(converted, wide, tmp_path):
    folder, lm, mmproj = converted["qwen2_vl"]
    _, lm3, mmproj3 = converted["qwen3_vl"]
    _, _, mmproj25 = converted["qwen2_5_vl"]

    def error(model, proj=None) -> str:
        with pytest.raises(GGUFError) as e:
            LLM(model, mmproj=proj, dtype="float32", **KV)
        return str(e.value)

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(lm.read_bytes()[: lm.stat().st_size // 2])
    assert "truncated" in error(cut, mmproj) and "cut.gguf" in error(cut, mmproj)
    assert "without its vision projector" in error(lm)
    assert "vision projector (mmproj) file" in error(mmproj)
    assert "does not belong" in error(lm, mmproj3)          # a Qwen3-VL projector for a Qwen2-VL model
    text = tmp_path / "llama.gguf"
    rewrite_arch(lm, text, "llama")
    assert "'llama' is not a Qwen-VL language model" in error(text, mmproj)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"not a gguf file at all")
    assert "not a GGUF file" in error(notgguf, mmproj)
    assert "not a vision projector" in error(lm, lm)
    holed = rewrite(lm, tmp_path / "holed.gguf", lambda n, s: "DROP" if n == "blk.1.ffn_up.weight" else None)
    assert "missing tensor(s) for model.language_model.layers.1.mlp.up_proj.weight" in error(holed, mmproj)
    assert "another model size" in error(converted["qwen2_5_vl"][1], wide[2])     # 256-wide projector, 64-wide LM
    # Qwen2.5-VL's projector fits Qwen2-VL's architecture and (here) width: it loads, with a warning naming both
    with pytest.warns(UserWarning, match="from another model"):
        open_pair(lm, mmproj25)


def rewrite_arch(src: Path, dst: Path, arch: str) -> None:
    """A copy of `src` claiming another architecture (its keys renamed too), as another model's file would."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    reader = GGUFReader(src)
    old = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch=arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        writer.add_key_value(key.replace(f"{old}.", f"{arch}.", 1), f.contents(), vtype,
                             sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
def test_chat_command_takes_model_and_mmproj_files(converted):
    """`qwenvl chat --model FILE.gguf --mmproj FILE.gguf` as a user runs it (a real subprocess)."""
    folder, lm, mmproj = converted["qwen2_5_vl"]
    image = folder.parent / "cli.png"
    _image(3, (112, 84)).save(image)
    args = ["--image", str(image), "--dtype", "float32", "--max-tokens", "6", "--temperature", "0",
            "Describe this image."]
    run = lambda *model: subprocess.run([sys.executable, "-m", "qwenvl", "chat", *model, *args],
                                        capture_output=True, text=True, timeout=300, cwd=ROOT)
    want, have = run("--model", str(folder)), run("--model", str(lm), "--mmproj", str(mmproj))
    assert want.returncode == 0 and have.returncode == 0, have.stderr[-2000:]
    assert have.stdout == want.stdout


def _ollama_store(root: Path, name: str, layers: dict[str, Path]) -> None:
    """An Ollama store under `root`: the manifest of library/<name>:latest and its blobs (links to the files)."""
    import hashlib
    entries = []
    for media, path in layers.items():
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        blob = root / "blobs" / digest.replace(":", "-")
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.symlink_to(path)
        entries.append({"mediaType": media, "digest": digest, "size": path.stat().st_size})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": entries}))


def test_ollama_store(converted, tmp_path, monkeypatch):
    """`ollama:NAME` resolves the manifest under OLLAMA_MODELS: a model + projector blob pair in llama.cpp's
    layout loads; Ollama's own single-file layout is an error that says what differs."""
    folder, lm, mmproj = converted["qwen2_5_vl"]
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    _ollama_store(tmp_path, "tinyvl", {"application/vnd.ollama.image.model": lm,
                                       "application/vnd.ollama.image.projector": mmproj})
    got = LLM("ollama:tinyvl", dtype="float32", **KV)
    assert got.engine.model_name == "tinyvl"
    _assert_same_answers(LLM(folder, dtype="float32", **KV), got, {"image": _conversations("qwen2_5_vl")["image"]})
    single = tmp_path / "single.gguf"
    rewrite_arch(lm, single, "qwen25vl")          # Ollama's architecture name for its one-file Qwen2.5-VL
    _ollama_store(tmp_path, "onefile", {"application/vnd.ollama.image.model": single})
    with pytest.raises(GGUFError, match="Ollama's own single-file layout.*'qwen25vl'"):
        LLM("ollama:onefile:latest", dtype="float32", **KV)
    with pytest.raises(GGUFError, match="no manifest"):
        LLM("ollama:absent:7b", dtype="float32", **KV)
