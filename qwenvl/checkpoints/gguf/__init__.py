"""GGUF checkpoints as llama.cpp's converter writes them: a language model file and its `mmproj` vision
projector file (issue 39). Read with the `gguf` package; see files.py (which files, checked), metadata.py
(config), tensor_names.py (names), weights.py (types), tokenizer.py (vocabulary and chat template) and
loader.py (the model)."""

from __future__ import annotations

from pathlib import Path

from .errors import GGUFError
from .files import GGUFPair, is_gguf_file, open_pair
from .ollama import is_ollama_name
from .loader import load_gguf_model
from .preprocessor import preprocessor_beside, preprocessor_config
from .tokenizer import GGUFVocabulary

__all__ = ["GGUFError", "GGUFPair", "GGUFVocabulary", "is_gguf_file", "is_gguf_model", "load_gguf_model",
           "open_pair", "preprocessor_beside", "preprocessor_config"]


def is_gguf_model(model: str | Path | None, mmproj: str | Path | None = None) -> bool:
    """Whether `model` names a GGUF model: a GGUF file, `mmproj` given, `ollama:NAME`, or a folder of .gguf
    files without a config.json (a Hugging Face folder with a stray .gguf stays a Hugging Face folder)."""
    if mmproj is not None:
        return True
    if model is None:
        return False
    if is_ollama_name(model):
        return True
    p = Path(model).expanduser()
    if p.is_file():
        return is_gguf_file(p)
    return p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))
