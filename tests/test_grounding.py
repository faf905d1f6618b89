"""Grounding: parsing real-world-shaped outputs of every family, conversion to original pixels,
multi-image assignment, prompts. Pure Python, no model."""

import pytest

from qwenvl.answers.grounding import (FAMILIES, convert_box, declared_grounding_prompt, grounding_prompt, parse_boxes,
                              parse_boxes_multi)

# Qwen2.5-VL resized sizes, computed by hand with Qwen's smart_resize (factor 28):
#   h_bar = round(h/28)*28, w_bar = round(w/28)*28; if h_bar*w_bar > max_pixels:
#   beta = sqrt(h*w/max_pixels), h_bar = floor(h/beta/28)*28, w_bar = floor(w/beta/28)*28;
#   if < min_pixels: beta = sqrt(min_pixels/(h*w)), h_bar = ceil(h*beta/28)*28, w_bar likewise.
#
# 1920x1080, max_pixels=1280*28*28=1003520:
#   round(1080/28)=39 -> 1092, round(1920/28)=69 -> 1932; 1092*1932=2109744 > 1003520
#   beta = sqrt(2073600/1003520) = 1.43747; 1080/1.43747/28 = 26.83 -> 26*28 = 728;
#   1920/1.43747/28 = 47.70 -> 47*28 = 1316.                                  input (1316, 728)
HD_IN, HD = (1316, 728), (1920, 1080)
# 4000x3000 (12 MP), max_pixels=16384*28*28=12845056 (Qwen2.5-VL's preprocessor default):
#   round(3000/28)=107 -> 2996, round(4000/28)=143 -> 4004; 2996*4004=11995984 <= max.  input (4004, 2996)
BIG_IN, BIG = (4004, 2996), (4000, 3000)
# 237x4741 (aspect 20), max_pixels=1003520:
#   round(4741/28)=169 -> 4732, round(237/28)=8 -> 224; 4732*224=1059968 > 1003520
#   beta = sqrt(1123617/1003520) = 1.058147; 4741/1.058147/28 = 160.02 -> 4480;
#   237/1.058147/28 = 7.9992 -> 7*28 = 196.                                  input (196, 4480)
TALL_IN, TALL = (196, 4480), (237, 4741)
# 50x40, min_pixels=56*56=3136: round(40/28)=1 -> 28, round(50/28)=2 -> 56; 1568 < 3136
#   beta = sqrt(3136/2000) = 1.25220; 40*1.2522/28 = 1.79 -> ceil 2 -> 56; 50*1.2522/28 = 2.24 -> 3 -> 84
SMALL_IN, SMALL = (84, 56), (50, 40)

N = None
# (id, family, text, input_size, image_size, expected [(label, x1, y1, x2, y2)])
CASES = [
    # ---- Qwen-VL: <ref>/<box>, 0..1000 grid -> x/1000*W
    ("qwenvl-chinese", "qwen_vl", "<ref>击掌</ref><box>(536,509),(588,602)</box>", N, (1024, 768),
     # 536*1.024, 509*0.768, 588*1.024, 602*0.768
     [("击掌", 548.864, 390.912, 602.112, 462.336)]),
    ("qwenvl-grounded-caption", "qwen_vl",
     "Picture shows <ref>a woman</ref><box>(100,200),(400,900)</box> playing with "
     "<ref>her dog</ref><box>(450,500),(700,950)</box> on the beach.", N, (2000, 1000),
     [("a woman", 200, 200, 800, 900), ("her dog", 900, 500, 1400, 950)]),
    ("qwenvl-one-label-many-boxes", "qwen_vl",
     "<ref>black cars</ref><box>(10,10),(100,100)</box><box>(200,200),(300,300)</box>, "
     "<box>(400,400),(500,500)</box>", N, (1000, 1000),
     [("black cars", 10, 10, 100, 100), ("black cars", 200, 200, 300, 300),
      ("black cars", 400, 400, 500, 500)]),
    ("qwenvl-box-without-label", "qwen_vl", "It is here: <box>(0,0),(500,500)</box>", N, (640, 480),
     [(N, 0, 0, 320, 240)]),
    ("qwenvl-label-broken-by-prose", "qwen_vl",
     "<ref>cat</ref><box>(0,0),(100,100)</box> is asleep. Also <box>(200,200),(300,300)</box>", N,
     (1000, 1000), [("cat", 0, 0, 100, 100), (N, 200, 200, 300, 300)]),
    ("qwenvl-quad", "qwen_vl", "<ref>OPEN</ref><quad>(100,100),(300,120),(290,300),(90,280)</quad>",
     N, (500, 1000), [("OPEN", 45, 100, 150, 300)]),
    # ---- Qwen2-VL special tokens, 0..1000 grid
    ("qwen2vl-basic", "qwen2_vl",
     "<|object_ref_start|>the man<|object_ref_end|><|box_start|>(123,235),(324,546)<|box_end|>", N,
     (1000, 2000), [("the man", 123, 470, 324, 1092)]),
    ("qwen2vl-pairs-in-one-tag", "qwen2_vl",
     "<|object_ref_start|>Apple<|object_ref_end|><|box_start|>(475,318),(492,337), "
     "(620,279),(631,301)<|box_end|>", N, (1000, 1000),
     [("Apple", 475, 318, 492, 337), ("Apple", 620, 279, 631, 301)]),
    ("qwen2vl-quad", "qwen2_vl",
     "<|object_ref_start|>限速60<|object_ref_end|><|quad_start|>(10,20),(50,20),(50,60),(10,60)<|quad_end|>",
     N, (2000, 1000), [("限速60", 20, 20, 100, 60)]),
    ("qwen2vl-truncated-mid-box", "qwen2_vl",
     "<|box_start|>(10,20),(30,40)<|box_end|><|box_start|>(50,60),(7", N, (1000, 1000),
     [(N, 10, 20, 30, 40)]),
    ("qwen2vl-missing-end-tag", "qwen2_vl", "<|box_start|>(10,20),(30,40)", N, (1000, 1000),
     [(N, 10, 20, 30, 40)]),
    ("qwen2vl-out-of-range-and-swapped", "qwen2_vl",
     "<|box_start|>(1003,700),(-5,200)<|box_end|>", N, (800, 600), [(N, 0, 120, 800, 420)]),
    ("qwen2vl-trailing-junk", "qwen2_vl",
     "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|><|im_end|>"
     "<|box_start|>garbage<|box_end|>", N, (300, 200), [("dog", 0, 0, 300, 200)]),
    ("qwen2vl-special-tokens-skipped", "qwen2_vl", "the man(123,235),(324,546)", N, (1000, 1000),
     [(N, 123, 235, 324, 546)]),
    # ---- Qwen2.5-VL JSON, absolute pixels of the resized input -> x * W / input_w
    ("qwen25-fenced-list", "qwen2_5_vl",
     '```json\n[\n\t{"bbox_2d": [658, 364, 1316, 728], "label": "cake"},\n'
     '\t{"bbox_2d": [100, 200, 300, 400], "label": "plate"}\n]\n```', HD_IN, HD,
     # 658*1920/1316 = 960, 364*1080/728 = 540; 100*1920/1316 = 145.8967, 200*1080/728 = 296.7033,
     # 300*1920/1316 = 437.6900, 400*1080/728 = 593.4066
     [("cake", 960, 540, 1920, 1080), ("plate", 145.8967, 296.7033, 437.6900, 593.4066)]),
    ("qwen25-unfenced-single-object", "qwen2_5_vl", '{"bbox_2d": [1001, 749, 3003, 2247], "label": "house"}',
     # 1001*4000/4004 = 1000, 749*3000/2996 = 750, 3003*4000/4004 = 3000, 2247*3000/2996 = 2250
     BIG_IN, BIG, [("house", 1000, 750, 3000, 2250)]),
    ("qwen25-point", "qwen2_5_vl", '```json\n[{"point_2d": [42, 28], "label": "红色按钮"}]\n```',
     SMALL_IN, SMALL, [("红色按钮", 25, 20, 25, 20)]),  # 42*50/84 = 25, 28*40/56 = 20
    ("qwen25-trailing-junk", "qwen2_5_vl",
     '```json\n[{"bbox_2d": [0, 0, 84, 56], "label": "all"}]\n```\nThese are the objects. {"oops": [1,',
     SMALL_IN, SMALL, [("all", 0, 0, 50, 40)]),
    ("qwen25-truncated-mid-list", "qwen2_5_vl",
     '```json\n[\n  {"bbox_2d": [98, 2240, 196, 4480], "label": "pole"},\n  {"bbox_2d": [10, 20, 3',
     # 98*237/196 = 118.5, 2240*4741/4480 = 2370.5, 196 -> 237, 4480 -> 4741
     TALL_IN, TALL, [("pole", 118.5, 2370.5, 237, 4741)]),
    ("qwen25-extra-keys-no-label", "qwen2_5_vl",
     '[{"bbox_2d": [0, 0, 658, 364], "sub_label": "x", "confidence": 0.9}, '
     '{"bbox_2d": [0, 0, 1316, 728], "label": "frame", "type": "object"}]', HD_IN, HD,
     [(N, 0, 0, 960, 540), ("frame", 0, 0, 1920, 1080)]),
    ("qwen25-nested-lists", "qwen2_5_vl",
     '[[{"bbox_2d": [0, 0, 42, 28], "label": "a"}], [{"bbox_2d": [[42, 28, 84, 56], [0, 28, 42, 56]], '
     '"label": "b"}]]', SMALL_IN, SMALL,
     [("a", 0, 0, 25, 20), ("b", 25, 20, 50, 40), ("b", 0, 20, 25, 40)]),
    ("qwen25-trailing-comma", "qwen2_5_vl",
     '[{"bbox_2d": [0, 0, 42, 28], "label": "a"}, {"bbox_2d": [42, 28, 84, 56], "label": "b"},]',
     SMALL_IN, SMALL, [("a", 0, 0, 25, 20), ("b", 25, 20, 50, 40)]),
    ("qwen25-out-of-range", "qwen2_5_vl", '{"bbox_2d": [-10, -3, 90, 60], "label": "edge"}', SMALL_IN, SMALL,
     [("edge", 0, 0, 50, 40)]),
    ("qwen25-xml-points", "qwen2_5_vl",
     '<points x1="42" y1="28" x2="84" y2="0" alt="star">star</points>', SMALL_IN, SMALL,
     [("star", 25, 20, 25, 20), ("star", 50, 0, 50, 0)]),
    # ---- Qwen3-VL JSON, 0..1000 grid
    ("qwen3-fenced-chinese", "qwen3_vl",
     '```json\n[\n  {"bbox_2d": [100, 250, 400, 750], "label": "猫"},\n  {"bbox_2d": [500, 0, 1000, 500], '
     '"label": "狗"}\n]\n```', N, (4000, 3000), [("猫", 400, 750, 1600, 2250), ("狗", 2000, 0, 4000, 1500)]),
    ("qwen3-point", "qwen3_vl", '[{"point_2d": [500, 500], "label": "center"}]', N, (641, 479),
     [("center", 320.5, 239.5, 320.5, 239.5)]),
    ("qwen3-extreme-aspect", "qwen3_vl", '{"bbox_2d": [0, 999, 1000, 1000], "label": "strip"}', N, (20000, 100),
     [("strip", 0, 99.9, 20000, 100)]),
    ("qwen3-ocr-text-content", "qwen3_vl",
     '```json\n[{"bbox_2d": [10, 10, 20, 20], "text_content": "出口"}]\n```', N, (1000, 1000),
     [("出口", 10, 10, 20, 20)]),
    ("qwen3-wrapped-objects", "qwen3_vl",
     'Sure! {"objects": [{"bbox_2d": [0, 0, 500, 500], "label": "tl"}]} Hope this helps.', N, (100, 100),
     [("tl", 0, 0, 50, 50)]),
    ("qwen3-no-boxes", "qwen3_vl", "I cannot find any [dog] in this image.", N, (100, 100), []),
    ("qwen3-truncated-everything", "qwen3_vl", '```json\n[{"bbox_2d": [1, 2, 3', N, (100, 100), []),
    # ---- cross-format fallback: Qwen2.5-VL answering in tags keeps its own (absolute) frame
    ("qwen25-tag-fallback", "qwen2_5_vl", "<|box_start|>(0,0),(42,28)<|box_end|>", SMALL_IN, SMALL,
     [(N, 0, 0, 25, 20)]),
]


@pytest.mark.parametrize("family,text,input_size,image_size,expected",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_table(family, text, input_size, image_size, expected):
    boxes = parse_boxes(text, family=family, input_size=input_size, image_size=image_size)
    got = [(b["label"], b["x1"], b["y1"], b["x2"], b["y2"]) for b in boxes]
    assert len(got) == len(expected), got
    for g, e in zip(got, expected):
        assert g[0] == e[0]
        assert g[1:] == pytest.approx(e[1:], abs=0.05)             # rounded to 0.1 px
        assert all(v == round(v, 1) for v in g[1:])


def test_quad_keeps_its_corners_in_original_pixels():
    [box] = parse_boxes("<|quad_start|>(100,100),(300,120),(290,300),(90,280)<|quad_end|>",
                        family="qwen2_vl", image_size=(500, 1000))
    assert box["points"] == [[50, 100], [150, 120], [145, 300], [45, 280]]
    assert (box["x1"], box["y1"], box["x2"], box["y2"]) == (45, 100, 150, 300)


@pytest.mark.parametrize("text", ["", "<box>", "<ref>", "```json\n[", "{]", "<|box_start|>(1,2),(3,",
                                  "<quad>(1,2),(3,4),(5,6)</quad>", '[{"bbox_2d": ["a", "b", 1, 2]}]',
                                  '{"bbox_2d": [1, 2]}', '{"point_2d": null}', "(" * 5000])
@pytest.mark.parametrize("family", FAMILIES)
def test_malformed_never_raises(text, family):
    assert parse_boxes(text, family=family, input_size=(28, 28), image_size=(10, 10)) == []


def test_without_image_size_coordinates_stay_in_model_frame():
    [b] = parse_boxes("<box>(900,10),(100,20)</box>", family="qwen_vl")
    assert (b["x1"], b["y1"], b["x2"], b["y2"]) == (100, 10, 900, 20)


def test_family_aliases_and_errors():
    text = '{"bbox_2d": [0, 0, 1000, 1000]}'
    assert parse_boxes(text, "Qwen3-VL-MoE", image_size=(10, 10))[0]["x2"] == 10
    assert parse_boxes(text, "qwen2.5_vl", input_size=(1000, 1000), image_size=(10, 10))[0]["x2"] == 10
    with pytest.raises(ValueError, match="unknown grounding family"):
        parse_boxes(text, family="llava")
    with pytest.raises(ValueError, match="image_size"):
        parse_boxes(text, family="qwen3_vl", image_size=(0, 10))


def test_qwen25_without_input_size_assumes_unresized():
    [b] = parse_boxes('{"bbox_2d": [10, 20, 30, 40]}', family="qwen2_5_vl", image_size=(100, 100))
    assert (b["x1"], b["y1"], b["x2"], b["y2"]) == (10, 20, 30, 40)


def test_convert_box_direct():
    raw = {"label": "x", "coords": [1316, 728, 0, 0]}
    assert convert_box(raw, "qwen2_5_vl", HD_IN, HD) == {"label": "x", "x1": 0, "y1": 0, "x2": 1920, "y2": 1080}


# ---- multi-image prompts


def test_multi_image_by_mention_order():
    # Picture 1: 1920x1080 seen as 1316x728; Picture 2: 50x40 seen as 84x56 (hand-computed above)
    text = ('In Picture 1 the cake is {"bbox_2d": [658, 364, 1316, 728], "label": "cake"}, '
            'and in Picture 2 the cup is {"bbox_2d": [42, 28, 84, 56], "label": "cup"}.')
    boxes = parse_boxes_multi(text, "qwen2_5_vl", [HD_IN, SMALL_IN], [HD, SMALL])
    assert [(b["label"], b["image_index"]) for b in boxes] == [("cake", 0), ("cup", 1)]
    assert (boxes[0]["x1"], boxes[0]["y2"]) == pytest.approx((960, 1080))
    assert (boxes[1]["x1"], boxes[1]["y1"], boxes[1]["x2"]) == pytest.approx((25, 20, 50))


def test_multi_image_chinese_mentions_and_tags():
    text = "图2中：<ref>狗</ref><box>(0,0),(500,500)</box>；第1张：<ref>猫</ref><box>(0,0),(1000,1000)</box>"
    boxes = parse_boxes_multi(text, "qwen_vl", None, [(100, 100), (400, 200)])
    assert [(b["label"], b["image_index"], b["x2"], b["y2"]) for b in boxes] == [("狗", 1, 200, 100),
                                                                               ("猫", 0, 100, 100)]


def test_multi_image_nested_lists_and_explicit_index():
    nested = '[[{"bbox_2d": [0, 0, 1000, 1000], "label": "a"}], [{"bbox_2d": [0, 0, 500, 500], "label": "b"}]]'
    boxes = parse_boxes_multi(nested, "qwen3_vl", None, [(10, 10), (100, 100)])
    assert [(b["label"], b["image_index"], b["x2"]) for b in boxes] == [("a", 0, 10), ("b", 1, 50)]
    explicit = '[{"bbox_2d": [0, 0, 1000, 1000], "image_index": 1}, {"bbox_2d": [0, 0, 1000, 1000], "image_index": 7}]'
    boxes = parse_boxes_multi(explicit, "qwen3_vl", None, [(10, 10), (100, 100)], default_index=0)
    assert [(b["image_index"], b["x2"]) for b in boxes] == [(1, 100), (0, 10)]  # 7 is out of range


def test_multi_image_default_is_last_image():
    boxes = parse_boxes_multi("<box>(0,0),(1000,1000)</box>", "qwen_vl", None, [(10, 10), (20, 30)])
    assert [(b["image_index"], b["x2"], b["y2"]) for b in boxes] == [(1, 20, 30)]
    assert parse_boxes_multi("<box>(0,0),(1,1)</box>", "qwen_vl", None, []) == []
    with pytest.raises(ValueError, match="one per image"):
        parse_boxes_multi("", "qwen2_5_vl", [(28, 28)], [(10, 10), (10, 10)])


# ---- prompts


def test_grounding_prompts():
    assert grounding_prompt("qwen_vl", "the dog") == "Generate the bounding box of the dog"
    assert grounding_prompt("qwen_vl", "击掌") == '输出"击掌"的检测框'
    assert grounding_prompt("qwen2_vl", "the man") == "Find <|object_ref_start|>the man<|object_ref_end|>"
    p25 = grounding_prompt("qwen2_5_vl", "cake")
    assert '"cake"' in p25 and "bbox" in p25 and "JSON" in p25
    assert "point" in grounding_prompt("qwen2_5_vl", "cake", points=True)
    p3 = grounding_prompt("qwen3_vl", "car")
    assert '"car"' in p3 and "JSON" in p3 and "bbox" in p3
    with pytest.raises(ValueError):
        grounding_prompt("gpt4v", "x")


def test_a_checkpoint_can_declare_its_own_grounding_request(tmp_path):
    assert declared_grounding_prompt(tmp_path, "the red triangle") is None          # no generation_config.json
    (tmp_path / "generation_config.json").write_text('{"do_sample": false}', encoding="utf-8")
    assert declared_grounding_prompt(tmp_path, "the red triangle") is None          # declares none
    (tmp_path / "generation_config.json").write_text(
        '{"grounding_prompt": "Locate {description}.", "grounding_prompt_zh": "找到{description}。"}', encoding="utf-8")
    assert declared_grounding_prompt(tmp_path, " the red triangle ") == "Locate the red triangle."
    assert declared_grounding_prompt(tmp_path, "红色的三角形") == "找到红色的三角形。"


def test_the_bundled_model_is_asked_to_ground_in_the_phrasing_it_was_trained_on():
    from qwenvl.engine.llm_engine import BUNDLED_MODEL_DIR
    from qwenvl.synthetic import QUESTIONS
    trained_en = QUESTIONS[("ground", "en")].format(color="red", shape="triangle")
    trained_zh = QUESTIONS[("ground", "zh")].format(color="红色", shape="三角形")
    assert declared_grounding_prompt(BUNDLED_MODEL_DIR, "the red triangle") == trained_en
    assert declared_grounding_prompt(BUNDLED_MODEL_DIR, "红色的三角形") == trained_zh
