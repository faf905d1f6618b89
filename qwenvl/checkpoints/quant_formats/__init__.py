"""Published pre-quantised checkpoint formats (issue 23 item 2): AWQ, GPTQ and FP8.

Each module has a packer (used by tests to build tiny checkpoints in the format's documented layout)
and an unpacker (used at load to turn the stored tensors back into integers + scales). The format is
read from `quantization_config.quant_method` in config.json, never guessed from tensor names.
spec.py reads and checks quantization_config; qwenvl/prequantized.py is the loader's hook that uses both.
Real published checkpoints cannot be fetched here (no hub access); the tests build tiny ones instead.
"""
from __future__ import annotations

SUPPORTED_METHODS = ("awq", "gptq", "fp8")


class UnsupportedQuantFormat(ValueError):
    pass


def quant_method(config: dict) -> str | None:
    """The checkpoint's declared quant_method (root or text_config), lower-cased; None when unquantised.
    Raises UnsupportedQuantFormat naming the format for anything but the supported ones."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise UnsupportedQuantFormat(
            f"quantization_config.quant_method={method!r} is not supported; supported pre-quantised "
            f"formats: {', '.join(SUPPORTED_METHODS)}")
    return method
