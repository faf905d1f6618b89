"""Tokenizer: encode/decode vs transformers, chat template lookup order, eos ids, streaming detokenisation."""

import json

import pytest

from qwenvl.inputs import InputError
from qwenvl.tokenizer import GROUNDING_TOKENS, IncrementalDetokenizer, Tokenizer, TokenizerError
from qwenvl.training.tokenizer_train import default_chat_template, save_tokenizer, train_tokenizer

CORPUS = ["Describe this image. The cat sits on the red mat near the window.",
          "Detect the dog and output its bounding box in JSON.",
          "这是一张图片。图中有一只猫坐在红色的垫子上。", "你好，我是一个视觉语言模型。"] * 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(CORPUS, 300), d, default_chat_template("qwen2_vl"))
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def test_encode_matches_transformers_and_knows_specials(tok, tok_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>猫 on the mat? 龘<|im_end|>\n"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    ids = tok.encode("<|image_pad|>")
    assert ids == [tok.token_to_id("<|image_pad|>")]


def test_decode_keeps_grounding_drops_turn_and_vision_tokens(tok):
    text = ("<|im_start|>assistant\n<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(1,2),(3,4)"
            "<|box_end|><|quad_start|>q<|quad_end|><|vision_start|><|image_pad|><|vision_end|><|im_end|>"
            "<|endoftext|>")
    out = tok.decode(tok.encode(text))
    assert out == ("assistant\n<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(1,2),(3,4)"
                   "<|box_end|><|quad_start|>q<|quad_end|>")
    for t in GROUNDING_TOKENS:
        assert t in out


def test_eos_ids_from_generation_config_and_tokenizer_config(tmp_path, tok_dir):
    for f in tok_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    t = Tokenizer.from_dir(tmp_path)
    im_end, eot = t.token_to_id("<|im_end|>"), t.token_to_id("<|endoftext|>")
    assert t.eos_token_ids == (im_end,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, im_end]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (eot, im_end)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eot}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (eot, im_end)


def test_chat_template_priority_and_rendering(tmp_path, tok_dir):
    from transformers import AutoTokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "CONFIG{{ messages[0].content }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msgs) == "CONFIGhi"
    (tmp_path / "chat_template.jinja").write_text("JINJA{{ messages[0].content }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msgs) == "JINJAhi"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "JSON{{ messages | tojson }}"}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msgs) == 'JSON[{"role": "user", "content": "hi"}]'
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no') }}"}))
    with pytest.raises(InputError, match="no"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(msgs)

    # The real template renders exactly as transformers renders it (Qwen3-VL's has tojson and a system part).
    for family in ("qwen2_vl", "qwen3_vl"):
        (tmp_path / "chat_template.json").unlink(missing_ok=True)
        (tmp_path / "chat_template.jinja").write_text(default_chat_template(family))
        hf = AutoTokenizer.from_pretrained(str(tmp_path))
        conv = [{"role": "system", "content": "Be brief <&>."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "text", "text": "And?"}, {"type": "video"}]}]
        for gen in (True, False):
            ours = Tokenizer.from_dir(tmp_path).apply_chat_template(conv, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)


def test_incremental_detokenizer_never_splits_utf8(tok):
    text = "你好，我是模型。龘靐齉 The cat 🐱 sits.<|box_start|>(1,2)<|box_end|>"
    ids = tok.encode(text) + [tok.token_to_id("<|im_end|>")]
    # the rare characters really are split over several byte-level tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    det = IncrementalDetokenizer(tok)
    deltas = [det.push(i) for i in ids]
    deltas.append(det.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert tok.decode(ids) == "你好，我是模型。龘靐齉 The cat 🐱 sits.<|box_start|>(1,2)<|box_end|>"


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
