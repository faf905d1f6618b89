"""bench/vs_llamacpp.py's pure helpers: the AMX source patch, the pre-tokenizer check, llama-bench's JSON,
and the bytes a GGUF decode step reads. (The bench itself builds llama.cpp and is not run here.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "vs_llamacpp.py"
spec = importlib.util.spec_from_file_location("vs_llamacpp", BENCH)
vs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vs)

# The shape of ggml-cpu/amx/mmq.cpp around the call (llama-cpp-python 0.3.36's vendored llama.cpp).
MMQ = """\
inline void ggml_tile_config_init(void) {
    static thread_local bool done = false;

    if (done) {
        return;
    }

    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    tc.rows[0] = 8;   tc.colsb[0] = 64;

    _tile_loadconfig(&tc);
    done = true;
}
"""


def test_amx_patch_puts_a_memory_barrier_right_before_the_tile_config_load_once():
    patched = vs.patch_amx_tile_config(MMQ)
    lines = patched.splitlines()
    at = lines.index("    _tile_loadconfig(&tc);")
    assert lines[at - 1] == '    __asm__ __volatile__("" ::: "memory");'
    assert vs.AMX_MARKER in lines[at - 2]
    assert patched.replace(lines[at - 2] + "\n" + lines[at - 1] + "\n", "") == MMQ    # nothing else changed
    assert vs.patch_amx_tile_config(patched) == patched                               # idempotent


def test_amx_patch_refuses_a_source_without_the_function():
    with pytest.raises(ValueError, match="ggml_tile_config_init"):
        vs.patch_amx_tile_config("void f(void) {\n    _tile_loadconfig(&tc);\n}\n")


def test_the_bench_tokenizer_is_recognised_as_qwen2_and_gpt2_is_not():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qwenvl.training.tokenizer_train import train_tokenizer
    ours = json.loads(train_tokenizer(["the cat sat on the mat", "a red fox"], 300).to_str())
    assert vs.pre_tokenizer_is_qwen2(ours)
    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert not vs.pre_tokenizer_is_qwen2(json.loads(gpt2.to_str()))
    assert not vs.pre_tokenizer_is_qwen2({"pre_tokenizer": None})


def test_llama_bench_records_give_prefill_and_decode():
    records = [{"n_prompt": 512, "n_gen": 0, "avg_ts": 60.0, "samples_ts": [58.5, 61.5], "build_commit": "0c1e570",
                "n_threads": 2},
               {"n_prompt": 0, "n_gen": 64, "avg_ts": 16.7, "build_commit": "0c1e570", "n_threads": 2}]
    # the best repetition where llama-bench lists them, else its mean
    assert vs.parse_llama_bench(records) == {"prefill": 61.5, "decode": 16.7, "build": "0c1e570", "threads": 2}
    with pytest.raises(ValueError, match="no pp and tg"):
        vs.parse_llama_bench(records[:1])


def test_decode_reads_every_tensor_but_an_untied_embedding():
    tied = [("token_embd.weight", 1000), ("blk.0.attn_q.weight", 10), ("output_norm.weight", 1)]
    assert vs.bytes_read_per_token(tied) == 1011                 # token_embd is the output head
    assert vs.bytes_read_per_token(tied + [("output.weight", 500)]) == 511


def test_gguf_tensor_bytes_are_the_stored_sizes(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(path, "qwen2vl")
    q8 = gguf.quants.quantize(np.ones((64, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    sizes = dict(vs.gguf_tensors(path))
    assert sizes == {"blk.0.ffn_up.weight": 64 * 34, "output_norm.weight": 32 * 4}    # Q8_0: 34 bytes per 32


def test_rounds_give_each_sides_median_and_the_median_of_the_per_round_ratios():
    rounds = [({"decode": 10.0, "prefill": 100.0, "build": "x"}, {"decode": 12.0, "prefill": 90.0}),
              ({"decode": 16.0, "prefill": 110.0, "build": "x"}, {"decode": 14.0, "prefill": 99.0}),
              ({"decode": 14.0, "prefill": 120.0, "build": "x"}, {"decode": 15.0, "prefill": 96.0})]
    row = vs.pair_row("int8", "Q8_0", rounds, 123)
    assert row["llama"]["decode"] == 14.0 and row["qwenvl"]["decode"] == 14.0 and row["llama"]["build"] == "x"
    assert row["decode_ratios"] == [1.2, 14.0 / 16.0, 15.0 / 14.0]          # its median, 15/14, is the ratio shown
    assert row["prefill_ratios"][0] == 0.9 and row["llama_bytes"] == 123


def _llamacpp_tree():
    import os
    home = Path(os.environ.get("QWENVL_LLAMACPP_HOME", vs.HOME))
    trees = sorted(home.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return trees[-1].parent if trees else None


@pytest.mark.skipif(_llamacpp_tree() is None, reason="no llama.cpp source tree (set QWENVL_LLAMACPP_HOME)")
def test_mmproj_conversion_of_a_transformers5_checkpoint_keeps_every_vision_tensor(tmp_path):
    """The bundled checkpoint is saved by transformers 5 (`model.visual.*`); without the converter shim the
    mmproj file had no tensors. Every tower tensor is there: per block q/k/v split from qkv (bias too), the
    patch embedding as two Conv2D halves, the merger's two linears (mm.0, mm.2) and its norm."""
    from safetensors import safe_open
    bundled = Path(__file__).resolve().parent.parent / "qwenvl" / "assets" / "bundled"
    path = vs.convert_mmproj(bundled, _llamacpp_tree(), tmp_path)
    names = {name for name, _ in vs.gguf_tensors(path)}
    with safe_open(bundled / "model.safetensors", "pt") as f:
        tower = [k for k in f.keys() if k.startswith("model.visual.")]
    qkv = sum(1 for k in tower if ".qkv." in k)
    assert len(names) == len(tower) + 2 * qkv + 1             # qkv -> q, k, v; the Conv3D -> 2 Conv2D
    assert {"mm.0.weight", "mm.2.weight", "v.post_ln.weight", "v.patch_embd.weight", "v.patch_embd.weight.1",
            "v.blk.0.attn_q.weight", "v.blk.3.attn_v.bias"} <= names
