"""`ollama:NAME[:TAG]` -> the GGUF blobs of a model in Ollama's local store.

The store (`OLLAMA_MODELS`, else ~/.ollama/models) keeps a JSON manifest per model at
manifests/<host>/<namespace>/<model>/<tag> (defaults registry.ollama.ai, library, latest) whose `layers`
list blobs by media type; a blob's file is blobs/<digest with ':' as '-'>. The weights are the layer
`application/vnd.ollama.image.model`; a llama.cpp-style vision projector, when the model has one, the layer
`application/vnd.ollama.image.projector`.

Which layouts load: a model blob plus a projector blob in llama.cpp's layout load as any GGUF pair. Ollama's
own converter writes its newer vision models (qwen2.5vl, qwen3-vl) differently: one GGUF holding both
towers, architecture `qwen25vl` (or the LM architecture with `<arch>.vision.*` keys) and vision tensors named
by its own rules (`v.patch_embd_0` / `_1`, `v.merger.*`, ...), with no projector layer. qwenvl does not
read that layout; the error says what differs and which files to use instead (see `single_file_error`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import GGUFError

PREFIX = "ollama:"
MODEL_MEDIA = "application/vnd.ollama.image.model"
PROJECTOR_MEDIA = "application/vnd.ollama.image.projector"
_DEFAULT_HOST, _DEFAULT_NAMESPACE, _DEFAULT_TAG = "registry.ollama.ai", "library", "latest"


def is_ollama_name(model) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def store_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def manifest_path(name: str) -> Path:
    """ollama:[host/][namespace/]model[:tag] -> its manifest file (read at call time: OLLAMA_MODELS may change)."""
    ref = name[len(PREFIX):]
    path, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", _DEFAULT_TAG)
    parts = path.split("/")
    if not path or len(parts) > 3 or not all(parts):
        raise GGUFError(f"{name!r}: not an Ollama model name (ollama:[host/][namespace/]model[:tag])")
    host, namespace = (_DEFAULT_HOST, _DEFAULT_NAMESPACE) if len(parts) == 1 else \
        (_DEFAULT_HOST, parts[0]) if len(parts) == 2 else (parts[0], parts[1])
    return store_dir() / "manifests" / host / namespace / parts[-1] / (tag or _DEFAULT_TAG)


def resolve(name: str) -> tuple[Path, Path | None]:
    """(model blob, projector blob or None) of an Ollama model; a GGUFError names what is missing."""
    path = manifest_path(name)
    if not path.is_file():
        raise GGUFError(f"{name!r}: no manifest at {path} (OLLAMA_MODELS={store_dir()}); `ollama pull` it first")
    try:
        layers = json.loads(path.read_text(encoding="utf-8"))["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GGUFError(f"{path}: not an Ollama manifest ({e!r})") from None
    blobs = {}
    for layer in layers:
        media, digest = layer.get("mediaType"), layer.get("digest", "")
        if media in (MODEL_MEDIA, PROJECTOR_MEDIA) and media not in blobs:
            blob = store_dir() / "blobs" / digest.replace(":", "-")
            if not blob.is_file():
                raise GGUFError(f"{name!r}: the manifest names blob {digest} ({media}), which is not in "
                                f"{blob.parent}; `ollama pull` it again")
            blobs[media] = blob
    if MODEL_MEDIA not in blobs:
        raise GGUFError(f"{path}: no {MODEL_MEDIA} layer (not a model manifest?)")
    return blobs[MODEL_MEDIA], blobs.get(PROJECTOR_MEDIA)


def single_file_error(name: str, blob: Path, arch: str | None) -> GGUFError:
    """The error for an Ollama model without a projector layer: what differs from llama.cpp's layout."""
    return GGUFError(
        f"{name!r} ({blob}): Ollama's own single-file layout, which qwenvl does not read. It differs from "
        f"llama.cpp's in three ways: one GGUF holds the language model and the vision tower (no separate "
        f"mmproj/projector layer in the manifest); the architecture is {arch!r} with the vision settings under "
        f"'{arch}.vision.*' (llama.cpp: 'qwen2vl' / 'qwen3vl' plus a 'clip' file with 'clip.vision.*'); and the "
        f"vision tensors carry Ollama's names (v.patch_embd_0/_1, v.merger.*; llama.cpp: v.patch_embd.weight(.1),"
        f" mm.0, mm.2, v.post_ln). Use llama.cpp's files for this model instead: --model MODEL.gguf --mmproj "
        f"mmproj-MODEL.gguf (e.g. from the ggml-org GGUF uploads on the Hugging Face Hub)")
