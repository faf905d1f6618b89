"""qwenvl: an open implementation of the Qwen-VL system.

    from qwenvl import LLM, SamplingParams
    out = LLM().chat([{"role": "user", "content": [{"image": "examples/shapes.png"}, {"text": "What color is the circle?"}]}])

The rooms (each package's docstring says more; a room imports only the rooms listed before it):
    models/       config dataclasses, the families and their registry
    layers/, kernels/   attention, rotary, norms, plain and quantised linears; our own CPU kernels
    checkpoints/  files -> weights (safetensors, Hub ids, pre-quantised formats, load-time quantisation)
    inputs/, structured/   messages -> pixels, tokens, positions; grammars and tools
    answers/      outputs, grounding, drawing, reasoning split, OCR post-processing
    engine/, distributed/   scheduler, KV blocks, runner, sampler; tensor parallelism
    llm.py        the Python API over the engine
    server/, web/, evaluation/, training/   HTTP APIs and demo, scorers, fine-tuning
    cli/          the `qwenvl` command
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .sampling_params import SamplingParams

# Modules that lived at the package root until issue 40 moved them: importable under the old name for one
# release (the same module object, so patches and isinstance checks agree), with a DeprecationWarning.
_MOVED = {
    **{f"qwenvl.{m}": f"qwenvl.checkpoints.{m}" for m in (
        "loader", "safetensors_reader", "checkpoint_keys", "load_error", "hub", "prequantized", "quantize",
        "huge_pages", "quant_formats")},
    **{f"qwenvl.{m}": f"qwenvl.answers.{m}" for m in (
        "outputs", "grounding", "drawing", "readable", "reasoning", "ocr")},
    "qwenvl.chat_repl": "qwenvl.cli.chat_repl",
    "qwenvl.bench_quick": "qwenvl.cli.bench_quick",
    "qwenvl.config": "qwenvl.models.config",
}


def _new_name(old: str) -> str | None:
    for was, now in _MOVED.items():
        if old == was or old.startswith(was + "."):
            return now + old[len(was):]
    return None


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new}; the old name goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module):
        pass                 # already executed under its new name


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        new = _new_name(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new))


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name):
    # Importing qwenvl stays cheap (no torch) until the model is actually used.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "RequestOutput":
        from .answers.outputs import RequestOutput
        return RequestOutput
    if f"qwenvl.{name}" in _MOVED:                # `qwenvl.grounding` after a plain `import qwenvl`
        return importlib.import_module(f"qwenvl.{name}")
    raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")


__all__ = ["LLM", "RequestOutput", "SamplingParams"]
