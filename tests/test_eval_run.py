"""`eval run` end to end, offline: synthetic datasets in the official formats, a fake predictor
that answers from the known answers (wrongly where told), exact expected scores, resume."""

import json
import re

import httpx
import pytest

from qwenvl.evaluation import cli, predictors
from qwenvl.evaluation.datasets import DatasetError, load
from qwenvl.evaluation.runner import run_benchmark, run_samples
from qwenvl.evaluation.score import score_file
from qwenvl.evaluation.synthetic import make

# benchmark -> (the questions answered wrongly, expected aggregate x100)
EXPECTED = {
    "docvqa": ({"Who signed the letter?"}, 100 * (1 + 1 + 0.8) / 3),       # ANLS("Jon Smyth") = 0.8
    "chartqa": ({"What is the value of the red bar?", "What percentage of votes is blue?"}, 200 / 3),
    "textvqa": ({"What number is on the shirt?"}, 80.0),                   # (1 + 0.6) / 2
    "ai2d": ({"What does the arrow point to?"}, 200 / 3),                  # 3 test questions
    "mmmu": ({"Which shape is round?"}, 200 / 3),                          # seed-42 fallback picks A, gold B
    "mathvista": ({"Which shape is drawn?"}, 200 / 3),
    "mmbench_cn": ({"图中有几个字？"}, 50.0),                                 # 2 circular groups
}


def fake_predictor(items, wrong, calls=None):
    def predict(messages):
        text = messages[-1]["content"][-1]["text"]
        assert messages[-1]["content"][0]["type"] == "image_url"
        item = next(i for i in items if i["question"] in text)
        if calls is not None:
            calls.append(item["question"])
        answer = item["wrong"] if item["question"] in wrong else item["right"]
        if item.get("mcq"):  # say the letter of the option carrying that text
            options = dict(re.findall(r"^([A-Z])\. (.*)$", text, re.M))
            answer = next((k for k, v in options.items() if v == answer), answer)
        return answer
    return predict


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for name in EXPECTED:
        if name == "mmmu":
            pytest.importorskip("pyarrow")
        out[name] = (root / name, make(name, root / name))
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_run_scores_exactly(name, synth, tmp_path):
    data_dir, items = synth[name]
    wrong, expected = EXPECTED[name]
    path = run_benchmark(name, data_dir, fake_predictor(items, wrong), tmp_path, progress=False)
    rows, summary = score_file(str(path))
    assert summary[name]["score"] == pytest.approx(expected)
    # every right answer scores 1
    _, perfect = score_file(str(run_benchmark(name, data_dir, fake_predictor(items, set()), tmp_path / "p",
                                              progress=False)))
    assert perfect[name]["score"] == 100.0


def test_mmbench_loader_circular(synth):
    samples = load("mmbench_cn", str(synth["mmbench_cn"][0]))
    assert len(samples) == 8 and {s.record["g_index"] for s in samples} == {0, 1}
    first = [s for s in samples if s.record["g_index"] == 0]
    # each rotation moves the right text ("蓝色") to another letter; every image resolved
    assert sorted(s.record["options"][s.record["answer"]] for s in first) == ["蓝色"] * 4
    assert len({s.record["answer"] for s in first}) == 4
    assert all(s.messages[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,") for s in samples)


def test_mmbench_rotations_made_when_file_has_none(tmp_path):
    from qwenvl.evaluation.synthetic import _mmbench_cn
    _mmbench_cn(tmp_path, circular=False)
    samples = load("mmbench_cn", str(tmp_path))
    assert sorted(s.id for s in samples) == [0, 1, 1000000, 1000001, 2000000, 2000001, 3000000, 3000001]


def test_limit_and_concurrency(synth, tmp_path):
    data_dir, items = synth["docvqa"]
    samples = load("docvqa", str(data_dir))
    stats = run_samples(samples, fake_predictor(items, set()), tmp_path / "a.jsonl", limit=2, progress=False)
    assert stats == {"done": 0, "new": 2, "total": 2}
    stats = run_samples(samples, fake_predictor(items, set()), tmp_path / "a.jsonl", concurrency=3, progress=False)
    assert stats == {"done": 2, "new": 1, "total": 3}
    ids = [json.loads(line)["id"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sorted(ids) == [100, 101, 102]


def test_killed_run_resumes(synth, tmp_path):
    data_dir, items = synth["chartqa"]
    out = tmp_path / "chartqa.jsonl"
    calls = []
    inner = fake_predictor(items, set(), calls)

    def dies_on_third(messages):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inner(messages)

    with pytest.raises(KeyboardInterrupt):
        run_benchmark("chartqa", data_dir, dies_on_third, tmp_path, progress=False)
    assert len(out.read_text().splitlines()) == 2
    with open(out, "a") as f:
        f.write('{"id": "augmented_0", "bench')  # torn write of a killed process
    calls2 = []
    run_benchmark("chartqa", data_dir, fake_predictor(items, set(), calls2), tmp_path, progress=False)
    assert calls2 == ["What percentage of votes is blue?"]
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["human_0", "human_1", "augmented_0"]
    assert score_file(str(out))[1]["chartqa"]["score"] == 100.0


def test_missing_files_say_what_is_expected(tmp_path):
    for name in EXPECTED:
        with pytest.raises(DatasetError, match="Expected"):
            load(name, str(tmp_path))


def test_cli_run_writes_report(synth, tmp_path, monkeypatch, capsys):
    data_dir, items = synth["textvqa"]
    wrong, _ = EXPECTED["textvqa"]
    monkeypatch.setattr(predictors, "local_predictor", lambda model, **kw: fake_predictor(items, wrong))
    rc = cli.main(["eval", "run", "--benchmark", "textvqa", "--data", str(data_dir), "--out", str(tmp_path),
                   "--label", "fake", "--no-progress"])
    assert rc == 0
    md = (tmp_path / "report.md").read_text()
    assert "| fake | - | - | - | 80.0% |" in md
    assert "| Qwen-VL-Max | 93.1% | 79.8% | 79.3% | 79.5% | 51.4% | 50.0% | 75.1% |" in md
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"][0]["scores"]["textvqa"] == 80.0 and report["rows"][0]["n"] == {"textvqa": 2}
    assert "qwenlm.github.io/blog/qwen-vl" in report["rows"][1]["source"]
    assert "/work/" not in md and "/work/" not in json.dumps(report)     # no developer's path in a report
    assert "80.0%" in capsys.readouterr().out


def test_one_folder_holds_one_models_predictions_and_a_rerun_says_it_resumes(synth, tmp_path, monkeypatch, capsys):
    data_dir, items = synth["textvqa"]
    asked = []
    monkeypatch.setattr(predictors, "local_predictor", lambda model, **kw: fake_predictor(items, set(), asked))
    run = ["eval", "run", "--benchmark", "textvqa", "--data", str(data_dir), "--out", str(tmp_path), "--no-progress"]
    assert cli.main(run + ["--limit", "1"]) == 0
    assert "resuming" not in capsys.readouterr().err
    assert json.loads((tmp_path / "run.json").read_text())["model"] == "bundled"
    assert cli.main(run) == 0                                   # the same model, all questions now
    assert "resuming " + str(tmp_path / "textvqa.jsonl") + ": 1 of 2 questions already answered, 1 to go" in \
        capsys.readouterr().err and len(asked) == 2
    assert cli.main(run) == 0
    assert "2 of 2 questions already answered, none left to answer; scoring only" in capsys.readouterr().err
    assert len(asked) == 2
    folder = tmp_path / "other-model"
    folder.mkdir()
    other = cli.main(run + ["--model", str(folder)])              # another model into the same folder: refused
    err = capsys.readouterr().err
    assert other == 2 and f"{tmp_path} holds the predictions of model bundled" in err and f"model {folder}" in err
    assert len(asked) == 2 and len((tmp_path / "textvqa.jsonl").read_text().splitlines()) == 2
    remote = cli.main(run + ["--endpoint", "http://127.0.0.1:9", "--model-name", "m"])
    assert remote == 2 and "endpoint http://127.0.0.1:9" in capsys.readouterr().err


def test_a_folder_from_before_run_json_is_adopted_with_a_note(synth, tmp_path, monkeypatch, capsys):
    data_dir, items = synth["textvqa"]
    monkeypatch.setattr(predictors, "local_predictor", lambda model, **kw: fake_predictor(items, set()))
    (tmp_path / "docvqa.jsonl").write_text("")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert cli.main(["eval", "run", "--benchmark", "textvqa", "--data", str(data_dir), "--out", str(tmp_path),
                     "--no-progress", "--model", str(ckpt)]) == 0
    assert f"do not say which model made them; they are taken as model {ckpt}'s" in capsys.readouterr().err
    assert json.loads((tmp_path / "run.json").read_text())["model"] == str(ckpt)


@pytest.mark.parametrize("command", ["run", "tasks"])
def test_a_model_that_is_not_there_is_named_not_none(synth, tmp_path, capsys, command):
    data_dir, _ = synth["textvqa"]
    args = {"run": ["--benchmark", "textvqa", "--data", str(data_dir), "--out", str(tmp_path), "--no-progress"],
            "tasks": ["--n", "1"]}[command]
    for model, says in ((str(tmp_path / "missing"), "no such folder"), ("nobody/no-such-model-xyz", "nobody/no-such")):
        rc = cli.main(["eval", command, *args, "--model", model, "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "None" not in err, err
        assert not (tmp_path / "run.json").exists()          # found before the folder is claimed for it


def test_os_errors_without_a_file_name_print_their_message():
    assert cli.os_error_message(FileNotFoundError(2, "No such file or directory", "x.jsonl")) == \
        "No such file or directory: x.jsonl"
    assert cli.os_error_message(FileNotFoundError("model 'm': no such folder")) == "model 'm': no such folder"
    assert cli.os_error_message(OSError()) == "OSError"


def test_cli_run_missing_data_is_clean(tmp_path, capsys):
    rc = cli.main(["eval", "run", "--benchmark", "docvqa", "--data", str(tmp_path / "nope"), "--endpoint",
                   "http://127.0.0.1:9", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "rrc.cvc.uab.es" in err


def _image_messages(synth):
    return load("docvqa", str(synth["docvqa"][0]))[0].messages


def test_openai_predictor_request(synth):
    seen = {}

    def handler(request):
        seen["url"] = str(request.url)
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": "INV-001"}}]})

    predict = predictors.openai_predictor("http://server/v1", "m", http_client=httpx.Client(
        transport=httpx.MockTransport(handler)))
    assert predict(_image_messages(synth)) == "INV-001"
    assert seen["url"] == "http://server/v1/chat/completions"
    assert seen["body"]["temperature"] == 0.0
    url = seen["body"]["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")  # file:// inlined for the remote server


def test_dashscope_predictor_request(synth):
    seen = {}

    def handler(request):
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json={"output": {"choices": [{"finish_reason": "stop", "message": {
            "role": "assistant", "content": [{"text": "INV-"}, {"text": "001"}]}}]}, "request_id": "r"})

    predict = predictors.dashscope_predictor("http://server", "qwen-vl-max", "k", http_client=httpx.Client(
        transport=httpx.MockTransport(handler)))
    assert predict(_image_messages(synth)) == "INV-001"
    assert seen["url"] == "http://server/api/v1/services/aigc/multimodal-generation/generation"
    assert seen["auth"] == "Bearer k"
    content = seen["body"]["input"]["messages"][0]["content"]
    assert content[0]["image"].startswith("data:image/png;base64,") and "text" in content[1]

    bad = predictors.dashscope_predictor("http://server", http_client=httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(400, json={"code": "InvalidParameter", "message": "bad image"}))))
    with pytest.raises(RuntimeError, match="400: InvalidParameter bad image"):
        bad(_image_messages(synth))


def test_local_predictor_is_lazy_and_greedy(monkeypatch, synth):
    import qwenvl

    made = []

    class FakeLLM:
        def __init__(self, model_dir=None, quantization=None, device="auto", revision=None):
            made.append((model_dir, device, revision))

        def chat(self, messages, params):
            assert (params.temperature, params.max_tokens) == (0.0, 16)
            return type("Out", (), {"text": "ok"})()

    class FakeParams:
        def __init__(self, temperature, max_tokens):
            self.temperature, self.max_tokens = temperature, max_tokens

    monkeypatch.setattr(qwenvl, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(qwenvl, "SamplingParams", FakeParams, raising=False)
    predict = predictors.local_predictor("org/ckpt", max_tokens=16, device="cpu", revision="v1")
    assert made == []
    assert predict(_image_messages(synth)) == "ok" and predict(_image_messages(synth)) == "ok"
    assert made == [("org/ckpt", "cpu", "v1")]
