"""Device choice: `auto` by default, and a CUDA request on a machine without CUDA is one clear line
(issue 29 item 12: it was a 28-line AssertionError from inside torch)."""

from __future__ import annotations

import re

import pytest
import torch

from qwenvl.engine.llm_engine import resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@no_cuda
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_names_the_torch_build_and_what_to_do(tiny_checkpoint):
    from qwenvl import LLM
    with pytest.raises(ValueError, match=rf"torch {re.escape(torch.__version__)}.*(CPU-only build.*pip install torch|sees no GPU)"):
        LLM(tiny_checkpoint("qwen2_vl"), device="cuda")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="'tpu0' is not a device torch knows"):
        resolve_device("tpu0")


@no_cuda
def test_cli_reports_the_cuda_problem_in_one_line(tiny_checkpoint, capsys):
    from qwenvl.cli.main import main
    assert main(["chat", "--model", str(tiny_checkpoint("qwen2_vl")), "--device", "cuda", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: device 'cuda'") and "Traceback" not in err and len(err.splitlines()) == 1
