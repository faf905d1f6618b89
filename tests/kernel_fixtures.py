"""Fixtures shared by the kernel test files: import them into a test module (`from kernel_fixtures import
compiled, isa`) and every test there runs against the compiled kernels, on each ISA this CPU has; and
`at_thread_counts`, for the tests that results do not depend on the thread count."""

import pytest
import torch

from qwenvl import kernels
from qwenvl.kernels import build

ISAS = ("avx512", "avx2")


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """The compiled module: the test command must exercise the kernels, so a failed build fails the tests."""
    if kernels.mode() == "off":
        pytest.skip("QWENVL_KERNELS=off")
    module, cause = build.load()
    assert module is not None, f"the kernels did not build: {cause}"
    assert kernels.isa() in ISAS
    return module


@pytest.fixture(params=ISAS)
def isa(request, compiled):
    """Both builds where this CPU runs them (an AVX2-only machine skips the AVX-512 cases)."""
    if not compiled.cpu_supports(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    return request.param


def at_thread_counts(fn, counts=(1, 2)) -> list:
    """fn() run once with torch's thread count at each of `counts`; the count is restored after."""
    before = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)
