"""Sampling defaults from the checkpoint's generation_config.json, for every request that leaves them out
(LLM.chat/generate with params=None, `qwenvl chat`, both HTTP APIs), as vLLM applies them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import httpx
import pytest

from qwenvl import LLM, SamplingParams
from qwenvl.engine.info import engine_info
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_cli import qwenvl
from test_server_fake_engine import DS_PATH, FakeAsyncEngine, run_server

HI = [{"role": "user", "content": "Say something."}]


def with_generation_config(tiny_checkpoint, tmp_path, **values):
    """A copy of the tiny checkpoint whose generation_config.json also sets `values`."""
    ckpt = shutil.copytree(tiny_checkpoint("qwen2_vl"), tmp_path / "ckpt")
    path = ckpt / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **values}))
    return ckpt


def test_llm_chat_without_params_samples_with_the_checkpoint_defaults(tiny_checkpoint, tmp_path):
    ckpt = with_generation_config(tiny_checkpoint, tmp_path, do_sample=True, temperature=1.0, top_k=1,
                                  repetition_penalty=1.0)
    llm = LLM(ckpt, dtype="float32", num_kv_blocks=64)
    assert llm.sampling_params() == SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1.0)
    assert llm.sampling_params(temperature=0.5, max_tokens=7).temperature == 0.5   # the caller's value wins
    assert engine_info(llm.engine).generation_defaults == {"temperature": 1.0, "top_k": 1, "repetition_penalty": 1.0}
    # top_k=1 samples the argmax: with the defaults applied, an unseeded answer is the greedy one.
    greedy = llm.chat(HI, SamplingParams(temperature=0.0, max_tokens=256))
    assert llm.chat(HI).token_ids == greedy.token_ids
    assert llm.generate([HI, HI])[1].token_ids == greedy.token_ids


def test_do_sample_false_means_greedy_and_bad_values_name_the_file(tmp_path):
    from qwenvl.sampling_params import checkpoint_sampling_defaults
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7,
                                                                  "top_p": 0.8, "eos_token_id": 3}))
    assert checkpoint_sampling_defaults(tmp_path) == {"temperature": 0.0, "top_p": 0.8}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match="generation_config.json.*top_p"):
        checkpoint_sampling_defaults(tmp_path)
    assert checkpoint_sampling_defaults(tmp_path / "missing") == {}


class RecordingEngine(FakeAsyncEngine):
    def __init__(self, defaults: dict):
        super().__init__()
        self._info = dataclasses.replace(self._info, generation_defaults=defaults)
        self.params: list[SamplingParams] = []

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        async for out in super().generate(prompt, params, request_id):
            yield out


def test_both_http_apis_fill_what_the_request_leaves_out_from_the_checkpoint():
    engine = RecordingEngine({"temperature": 0.25, "top_p": 0.8, "top_k": 3, "repetition_penalty": 1.05})
    with run_server(create_app(engine, ServerSettings())) as url:
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HI}).status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HI, "temperature": 0.9,
                                                               "top_k": -1}).status_code == 200
        assert httpx.post(url + DS_PATH, json={"input": {"messages": HI}, "parameters": {"top_p": 0.5}}
                          ).status_code == 200
    plain, given, dashscope = engine.params
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (0.25, 0.8, 3, 1.05)
    assert (given.temperature, given.top_p, given.top_k) == (0.9, 0.8, 0)
    assert (dashscope.temperature, dashscope.top_p, dashscope.top_k) == (0.25, 0.5, 3)


def test_cli_chat_temperature_defaults_to_the_checkpoint(tiny_checkpoint, tmp_path):
    ckpt = with_generation_config(tiny_checkpoint, tmp_path, do_sample=True, temperature=1.5)
    ask = ("chat", "--model", str(ckpt), "--dtype", "float32", "--device", "cpu", "--seed", "0",
           "--max-tokens", "12", "Say something.")
    default, hot = qwenvl(*ask), qwenvl(*ask, "--temperature", "1.5")
    assert default.returncode == 0, default.stderr
    assert default.stdout == hot.stdout          # the same seeded draw at the checkpoint's temperature (not greedy)
    from qwenvl.cli.main import build_parser
    chat = build_parser()._subparsers._group_actions[0].choices["chat"]
    assert "generation_config.json" in chat.format_help()
