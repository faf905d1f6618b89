"""The automatic compute dtype: bfloat16 only where this CPU multiplies it fast (timed, not guessed)."""

import math

import pytest
import torch

from qwenvl.engine import cpu_dtype
from qwenvl.engine.llm_engine import resolve_dtype
from qwenvl.training.sft import TrainConfig, bf16_autocast


@pytest.fixture
def cpu_speed(monkeypatch):
    """Set how much slower bfloat16 products are on 'this CPU'; counts the probes the code runs."""
    probes = []

    def set_slowdown(value: float):
        def fake() -> float:
            probes.append(value)
            return value
        monkeypatch.setattr(cpu_dtype, "bfloat16_slowdown", fake)
        cpu_dtype.cpu_bfloat16_is_fast.cache_clear()
        return probes

    yield set_slowdown
    cpu_dtype.cpu_bfloat16_is_fast.cache_clear()


def test_the_real_probe_measures_a_finite_positive_ratio():
    ratio = cpu_dtype.bfloat16_slowdown()
    assert math.isfinite(ratio) and ratio > 0


def test_a_cpu_with_slow_bfloat16_computes_in_float32(cpu_speed):
    probes = cpu_speed(16.0)                 # what an AVX2-only EPYC measured
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert probes == [16.0]                  # measured once per process, then remembered
    assert resolve_dtype(None, "cpu") == torch.float32 and probes == [16.0]


def test_a_cpu_with_fast_bfloat16_keeps_it(cpu_speed):
    cpu_speed(0.3)                           # native BF16 dot products: several times faster than float32
    assert resolve_dtype(None, "cpu") == torch.bfloat16


def test_an_explicit_dtype_and_a_gpu_never_probe_the_cpu(cpu_speed):
    probes = cpu_speed(16.0)
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    assert resolve_dtype(None, "cuda:0") == torch.bfloat16
    assert probes == []


@pytest.mark.parametrize("slowdown, asked, expected", [
    (16.0, None, False),                     # left open on a slow CPU: train in float32
    (0.3, None, True),                       # left open on a fast CPU: autocast on
    (16.0, True, True),                      # asked for: honoured even where it is slow
    (0.3, False, False),
])
def test_training_autocast_follows_the_cpu_when_left_open(cpu_speed, slowdown, expected, asked):
    cpu_speed(slowdown)
    cfg = TrainConfig(model_dir="unused", out_dir="unused", autocast_bf16=asked)
    with bf16_autocast(cfg, torch.device("cpu")):
        out = torch.randn(4, 8) @ torch.randn(8, 4)
    assert (out.dtype == torch.bfloat16) == expected


def test_noise_around_parity_keeps_bfloat16(cpu_speed):
    cpu_speed(1.3)                           # a native-bf16 CPU timed while a neighbour was busy
    assert resolve_dtype(None, "cpu") == torch.bfloat16
