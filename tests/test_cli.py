"""The `qwenvl` command, end to end on the bundled model (run as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "shapes.png"


def qwenvl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenvl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_lists_every_subcommand():
    out = qwenvl("--help")
    assert out.returncode == 0
    for name in ("chat", "ground", "serve", "eval", "train", "bench"):
        assert name in out.stdout


def test_ground_prints_boxes_in_image_pixels_and_draws_them(tmp_path):
    drawn = tmp_path / "boxes.png"
    out = qwenvl("ground", str(EXAMPLE), "the red triangle", "--draw", str(drawn))
    assert out.returncode == 0, out.stderr
    text, boxes_line = out.stdout.strip().splitlines()[-2:]
    boxes = json.loads(boxes_line)
    original = Image.open(EXAMPLE).convert("RGB")
    W, H = original.size
    assert "<|box_start|>" in text and boxes, "the bundled model answers grounding prompts with a box"
    for b in boxes:
        assert 0 <= b["x1"] <= b["x2"] <= W and 0 <= b["y1"] <= b["y2"] <= H
    # The drawing changed pixels along the first box's top edge, and only there-abouts.
    after = np.asarray(Image.open(drawn).convert("RGB")).astype(int)
    before = np.asarray(original).astype(int)
    b = boxes[0]
    y, x1, x2 = int(b["y1"]), int(b["x1"]), int(b["x2"])
    if x2 - x1 >= 4:
        assert np.abs(after[min(y, H - 1), x1 + 1:x2 - 1] - before[min(y, H - 1), x1 + 1:x2 - 1]).sum() > 0
    assert after.shape == before.shape


def test_chat_answers_and_bad_image_is_a_clear_error(tmp_path):
    out = qwenvl("chat", "--image", str(EXAMPLE), "How many circles are there?", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() != ""
    loads = [line for line in out.stderr.splitlines() if line.startswith("loading ")]
    assert len(loads) == 1 and "assets/bundled (qwen2_vl, cpu, " in loads[0] and "not quantised" in loads[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    out = qwenvl("chat", "--image", str(bad), "What is this?")
    assert out.returncode == 2
    assert "broken.png" in out.stderr and "Traceback" not in out.stderr


def test_eval_tasks_scores_the_bundled_model_on_heldout_items(tmp_path):
    out_file = tmp_path / "scores.json"
    out = qwenvl("eval", "tasks", "--n", "3", "--task", "count", "--task", "chart", "--lang", "en",
                 "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    record = json.loads(out_file.read_text())
    assert record["n_per_task_lang"] == 3 and set(record["scores"]) == {"count/en", "chart/en", "all"}
    # 3 items per task, 6 in all: accuracies are whole numbers of items (written to 4 decimals)
    scores = record["scores"]
    assert all(abs(scores[k] * 3 - round(scores[k] * 3)) < 1e-3 for k in ("count/en", "chart/en"))
    assert abs(scores["all"] * 6 - round(scores["all"] * 6)) < 1e-3
    assert abs(scores["all"] - (scores["count/en"] + scores["chart/en"]) / 2) < 1e-3
    count_row = next(line for line in out.stdout.splitlines() if line.startswith("| count |"))
    assert f"{record['scores']['count/en']:.1%}" in count_row and "90%" in count_row
    assert "tasks: 100%" in out.stderr and "6/6" in out.stderr           # the progress bar, over the 6 items
    bad = qwenvl("eval", "tasks", "--n", "0")
    assert bad.returncode == 2 and "--n must be at least 1" in bad.stderr


def test_python_dash_m_qwenvl_is_the_command():
    r = subprocess.run([sys.executable, "-m", "qwenvl", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "chat" in r.stdout and "serve" in r.stdout


def test_media_given_with_the_wrong_flag_or_missing_is_named_before_the_model_loads(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from video_files import write_video
    clip = write_video(tmp_path / "clip.mp4", seconds=1, fps=4)
    unnamed = tmp_path / "recording"                         # a clip without a video suffix: read by content
    unnamed.write_bytes(clip.read_bytes())
    cases = [(["chat", "--image", str(tmp_path / "nope.png"), "Hi"], f"--image {tmp_path / 'nope.png'}: no such file"),
             (["chat", "--image", str(clip), "Hi"], f"a video file; give it with --video {clip}"),
             (["chat", "--image", str(unnamed), "Hi"], f"a video file; give it with --video {unnamed}"),
             (["chat", "--video", str(EXAMPLE), "Hi"], f"an image file; give it with --image {EXAMPLE}"),
             (["chat", "--video", str(tmp_path / "gone.mp4"), "Hi"], "--video"),
             (["ground", str(clip), "the cat"], "a video file"),
             (["ocr", str(tmp_path), "--task", "text_recognition"], "a folder, not a file")]
    for argv, says in cases:
        out = qwenvl(*argv)
        assert out.returncode == 2 and says in out.stderr, (argv, out.stderr)
        assert "loading " not in out.stderr and "Traceback" not in out.stderr     # found before any model loads


def test_train_finds_its_model_like_chat_and_defaults_to_auto(tmp_path):
    from qwenvl.cli.main import build_parser
    args = build_parser().parse_args(["train", "--model", "Org/Name", "--out", str(tmp_path)])
    assert args.device == "auto" and args.revision is None
    missing = qwenvl("train", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--steps", "1")
    assert missing.returncode == 2 and "no such folder, and not a Hugging Face Hub id" in missing.stderr
    env_offline = subprocess.run([sys.executable, "-m", "qwenvl", "train", "--model", "nobody/no-such-model-xyz",
                                  "--out", str(tmp_path / "run"), "--steps", "1"], capture_output=True, text=True,
                                 timeout=120, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert env_offline.returncode == 2 and "is not in the local Hugging Face cache" in env_offline.stderr


def test_chat_about_a_video_file_and_a_bad_one(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from video_files import write_video
    clip = write_video(tmp_path / "clip.mp4", seconds=2, fps=10)
    out = qwenvl("chat", "--video", str(clip), "--fps", "1", "What happens?", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() != ""
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    out = qwenvl("chat", "--video", str(bad), "What happens?")
    assert out.returncode == 2
    assert "broken.mp4" in out.stderr and "not a video file" in out.stderr and "Traceback" not in out.stderr


def _dashscope_stub():
    """A real HTTP server that answers only DashScope's full route (anything else is 404), on a free port."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            ok = self.path == "/api/v1/services/aigc/multimodal-generation/generation"
            body = json.dumps({"output": {"choices": [{"finish_reason": "stop", "message": {
                "role": "assistant", "content": [{"text": "A"}]}}]}, "request_id": "r"} if ok else
                {"code": "NotFound", "message": self.path, "request_id": "r"}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_eval_run_dashscope_endpoint_with_or_without_api_v1(tmp_path):
    assert qwenvl("eval", "synth", "--benchmark", "ai2d", "--out", str(tmp_path)).returncode == 0
    server = _dashscope_stub()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for i, endpoint in enumerate((base, base + "/api/v1", base + "/api/v1/")):
            out = qwenvl("eval", "run", "--benchmark", "ai2d", "--data", str(tmp_path / "ai2d"), "--api", "dashscope",
                         "--endpoint", endpoint, "--limit", "1", "--no-progress", "--out", str(tmp_path / f"r{i}"))
            assert out.returncode == 0, (endpoint, out.stderr)
            assert "404" not in out.stderr
    finally:
        server.shutdown()


def _parsers(parser, name="qwenvl"):
    """Every parser of the command tree: ("qwenvl serve", parser), ..."""
    import argparse
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_help_explains_every_flag_with_its_default_and_version_comes_from_the_package():
    import argparse
    from importlib.metadata import version

    from qwenvl.cli.main import build_parser
    for name, parser in _parsers(build_parser()):
        unexplained = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
        assert not unexplained, f"{name}: flags without help: {unexplained}"
    out = qwenvl("serve", "--help")
    assert out.returncode == 0
    flat = " ".join(out.stdout.split())
    assert "--port PORT" in flat and "(default: 8000)" in flat and "(default: 127.0.0.1)" in flat
    assert "(default: None)" not in flat
    out = qwenvl("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"qwenvl {version('qwenvl')}"


def test_serve_on_a_busy_port_fails_at_once_before_loading_the_model(tmp_path):
    import socket
    import time
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        # A model folder that does not exist: had the model loaded first, that would be the error.
        out = qwenvl("serve", "--model", str(tmp_path / "no-such-model"), "--port", str(port), timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:" + str(port)), out.stderr
    assert "no-such-model" not in out.stderr and time.monotonic() - t0 < 30


def test_chat_interactive_prompt_readable_grounding_and_ctrl_c_twice_at_the_prompt_ends():
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl", "chat", "--image", str(EXAMPLE)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write("Locate the red triangle.\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert answer.startswith("**the red triangle** `[(") and "<|" not in answer, answer
        time.sleep(1.0)                              # back at the prompt, waiting for a line
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err.count(">>> ") == 3 and "Ctrl-C again" in err and "Traceback" not in err


def _serve_sees(env: dict) -> str:
    """What `qwenvl serve` has when it starts serving: GOMP_SPINCOUNT and whether torch (libgomp) is loaded yet;
    a real process with the server itself replaced by a print."""
    code = ("import os, sys; import qwenvl.server.cli as s; "
            "s.run_serve_command = lambda a: print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules, "
            "os.environ.get('OMP_NUM_THREADS')) or 0; "
            "from qwenvl.cli.main import main; sys.exit(main(['serve']))")
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**clean, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_serve_quiets_openmp_spinning_before_torch_loads_unless_the_user_chose():
    assert _serve_sees({}) == "10000 False 1"               # set, libgomp not loaded yet; the bundled model: 1 thread
    assert _serve_sees({"GOMP_SPINCOUNT": "300000"}) == "300000 False 1"   # the user's value stays
    assert _serve_sees({"OMP_WAIT_POLICY": "active"}) == "None False 1"    # the user chose the spinning another way
    assert _serve_sees({"OMP_NUM_THREADS": "2"}) == "10000 False 2"        # and the thread count


def test_serve_runs_a_small_model_on_one_thread_unless_the_user_chose(tmp_path):
    from qwenvl.cli import openmp
    from qwenvl.engine.llm_engine import BUNDLED_MODEL_DIR
    assert openmp.BUNDLED_MODEL_DIR == BUNDLED_MODEL_DIR
    env = {}
    assert openmp.one_thread_for_a_small_model(None, env) and env == {"OMP_NUM_THREADS": "1"}     # the bundled model
    env = {"OMP_NUM_THREADS": "2"}
    assert not openmp.one_thread_for_a_small_model(None, env) and env == {"OMP_NUM_THREADS": "2"}
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:           # sparse: 64 MiB on disk without writing it
        f.truncate(openmp.SMALL_MODEL_BYTES)
    (tmp_path / "tiny.gguf").write_bytes(b"x" * 1000)
    (tmp_path / "empty").mkdir()
    for model, expected in ((str(big), False), (str(tmp_path / "tiny.gguf"), True), ("Qwen/Qwen2-VL-2B-Instruct", False),
                            (str(tmp_path / "empty"), False)):      # a folder without weight files: not measured
        env = {}
        assert openmp.one_thread_for_a_small_model(model, env) is expected, model
        assert env == ({"OMP_NUM_THREADS": "1"} if expected else {})


def test_quiet_spinning_sets_the_count_once_and_never_over_a_users_choice():
    from qwenvl.cli import openmp
    env = {}
    assert openmp.quiet_spinning(env) and env == {"GOMP_SPINCOUNT": "10000"}
    assert not openmp.quiet_spinning(env) and env == {"GOMP_SPINCOUNT": "10000"}
    env = {"OMP_WAIT_POLICY": "passive"}
    assert not openmp.quiet_spinning(env) and env == {"OMP_WAIT_POLICY": "passive"}


def test_serve_caps_a_decoding_steps_prefill_and_vision_by_model_size(tmp_path, monkeypatch):
    """qwenvl serve's latency caps where the command line leaves them out: 256 / 8192 for a model under 64 MiB
    (the bundled one), 64 / 1024 otherwise (and where the size is not known here); what the user gives stands, and
    0 reaches the engine as no cap."""
    import argparse
    from qwenvl.cli import openmp, serving_defaults
    from qwenvl.server import cli as server_cli
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:           # sparse: 64 MiB on disk without writing it
        f.truncate(openmp.SMALL_MODEL_BYTES)
    for model, caps in ((None, (256, 8192)), (str(big), (64, 1024)), ("Qwen/Qwen2-VL-2B-Instruct", (64, 1024))):
        args = argparse.Namespace(max_prefill_tokens_while_decoding=None, vision_rows_per_step=None)
        serving_defaults.fill_latency_options(args, model)
        assert (args.max_prefill_tokens_while_decoding, args.vision_rows_per_step) == caps, model
    args = argparse.Namespace(max_prefill_tokens_while_decoding=0, vision_rows_per_step=512)
    serving_defaults.fill_latency_options(args, None)
    assert (args.max_prefill_tokens_while_decoding, args.vision_rows_per_step) == (0, 512)
    seen = {}
    monkeypatch.setattr(server_cli, "serve", lambda settings, engine_options, hard_exit: seen.update(engine_options))
    monkeypatch.setattr(server_cli, "settings_from_args", lambda a: None)
    server_cli.run_serve_command(args)
    assert seen["max_prefill_tokens_while_decoding"] is None and seen["vision_rows_per_step"] == 512
