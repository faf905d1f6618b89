"""Which GGUF files make a model, opened and checked before anything large is allocated.

A Qwen-VL model in llama.cpp's layout is two files: the language model (`general.type` "model",
`general.architecture` qwen2vl / qwen3vl / qwen3vlmoe) and the vision projector (`general.type` "mmproj",
architecture "clip", `clip.projector_type` naming the merger). They are named together
(`LLM("m.gguf", mmproj="mmproj.gguf")`) or found in one folder holding exactly one of each.

The `gguf` package reads the header and memory-maps the data: opening a file costs its metadata only, so
every check here (truncation, architecture, a projector of another model) runs before any weight is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ollama
from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
# llama.cpp's architecture name -> the projector types that belong to it -> our family
FAMILY_OF = {
    ("qwen2vl", "qwen2vl_merger"): "qwen2_vl",
    ("qwen2vl", "qwen2.5vl_merger"): "qwen2_5_vl",
    ("qwen3vl", "qwen3vl_merger"): "qwen3_vl",
    ("qwen3vlmoe", "qwen3vl_merger"): "qwen3_vl_moe",
}
LM_ARCHITECTURES = sorted({a for a, _ in FAMILY_OF})
PROJECTOR_TYPES = sorted({p for _, p in FAMILY_OF})


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_reader(path: Path):
    """A GGUFReader over `path`, or a GGUFError saying why not (not GGUF, truncated or corrupt)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError(f"{path}: reading GGUF files needs the `gguf` package: pip install 'qwenvl[gguf]'") from None

    class Reader(GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map. The reader slices its map once per
        metadata value (two slices per token of a 151k vocabulary); a slice of an np.memmap runs memmap's
        Python __array_finalize__, a plain view's does not: opening a 2B-width Q4_K_M file (151936-token
        vocabulary) took 8.7 s with the memmap, 2.5 s with the view (2-core VM, busy). Same bytes, still
        paged in lazily by the OS."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    if not is_gguf_file(path):
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return Reader(path)
    except (ValueError, IndexError, OSError) as e:
        # The reader maps every tensor while reading the header: a file cut short fails there.
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({path.stat().st_size} bytes; "
                        f"the reader said: {e}); download it again") from None


def field(reader, key: str, default=None):
    """The metadata value of `key` (a scalar, string or list), or `default` when the file lacks it."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _kind(reader) -> tuple[str, str | None]:
    """(general.type or a guess from the architecture, general.architecture)."""
    arch = field(reader, "general.architecture")
    kind = field(reader, "general.type") or ("mmproj" if arch == "clip" else "model")
    return kind, arch


@dataclass(frozen=True)
class GGUFPair:
    """A language model GGUF and its vision projector GGUF, opened and checked to belong together."""
    model_path: Path
    mmproj_path: Path
    lm: object              # gguf.GGUFReader of the language model
    mmproj: object          # gguf.GGUFReader of the projector
    family: str             # our model_type
    name: str = ""          # what the API calls the model: the file's stem, or the Ollama name

    @property
    def folder(self) -> Path:
        return self.model_path.parent


def find_files(model: str | Path, mmproj: str | Path | None) -> tuple[Path, Path]:
    """(language model file, projector file) for a .gguf path plus `mmproj`, a folder of GGUFs, or an
    `ollama:NAME[:TAG]` in Ollama's local store."""
    if ollama.is_ollama_name(model):
        blob, projector = ollama.resolve(model)
        if mmproj is None and projector is None:
            reader = open_reader(blob)
            arch = field(reader, "general.architecture")
            if arch not in LM_ARCHITECTURES or any(t.name.startswith("v.") for t in reader.tensors):
                raise ollama.single_file_error(model, blob, arch)
        return blob, Path(mmproj).expanduser() if mmproj is not None else projector
    model = Path(model).expanduser()
    if model.is_dir():
        found = sorted(model.glob("*.gguf"))
        lms = [p for p in found if not _looks_like_projector(p)]
        projectors = [p for p in found if _looks_like_projector(p)]
        if mmproj is not None:
            projectors = [Path(mmproj).expanduser()]
        if len(lms) != 1 or len(projectors) != 1:
            raise GGUFError(f"{model}: a GGUF folder must hold exactly one language model .gguf and one mmproj "
                            f".gguf; found models {[p.name for p in lms]} and projectors "
                            f"{[p.name for p in projectors]} (name the files: LLM('m.gguf', mmproj='mmproj.gguf'))")
        return lms[0], projectors[0]
    if mmproj is None:
        kind, arch = _kind(open_reader(model))
        if kind == "mmproj":
            raise GGUFError(f"{model}: this is a vision projector (mmproj) file; pass the language model GGUF "
                            "as the model and this file as mmproj")
        raise GGUFError(f"{model}: a GGUF language model ({arch}) without its vision projector; pass "
                        "mmproj='mmproj-....gguf' (--mmproj FILE), the file llama.cpp's converter writes with "
                        "--mmproj, or put both files in one folder")
    return model, Path(mmproj).expanduser()


def _looks_like_projector(path: Path) -> bool:
    """A folder's projector is the file whose header says mmproj (read from the header, not the name)."""
    try:
        return _kind(open_reader(path))[0] == "mmproj"
    except GGUFError:
        return "mmproj" in path.name.lower()


def open_pair(model: str | Path, mmproj: str | Path | None) -> GGUFPair:
    """Open and cross-check the two files; every GGUFError names the file and the mismatch."""
    model_path, mmproj_path = find_files(model, mmproj)
    if mmproj_path is None:
        raise GGUFError(f"{model}: a GGUF language model without its vision projector; pass mmproj=... (--mmproj)")
    lm, proj = open_reader(model_path), open_reader(mmproj_path)
    lm_kind, arch = _kind(lm)
    proj_kind, proj_arch = _kind(proj)
    if lm_kind == "mmproj":
        raise GGUFError(f"{model_path}: a vision projector (mmproj) file was given as the language model")
    if proj_kind != "mmproj" or proj_arch != "clip":
        raise GGUFError(f"{mmproj_path}: not a vision projector (general.type {proj_kind!r}, architecture "
                        f"{proj_arch!r}; an mmproj file has type 'mmproj' and architecture 'clip')")
    if arch not in LM_ARCHITECTURES:
        raise GGUFError(f"{model_path}: general.architecture {arch!r} is not a Qwen-VL language model; "
                        f"qwenvl reads {', '.join(LM_ARCHITECTURES)}")
    projector = field(proj, "clip.projector_type") or field(proj, "clip.vision.projector_type")
    family = FAMILY_OF.get((arch, projector))
    if family is None:
        raise GGUFError(f"{mmproj_path}: projector type {projector!r} does not belong to the {arch} language "
                        f"model in {model_path.name} (a projector of another model?); {arch} takes "
                        f"{', '.join(p for a, p in FAMILY_OF if a == arch)}")
    lm_width = field(lm, f"{arch}.embedding_length")
    proj_width = field(proj, "clip.vision.projection_dim")
    if lm_width != proj_width:
        raise GGUFError(f"{mmproj_path}: the projector outputs {proj_width}-wide embeddings but the language "
                        f"model in {model_path.name} is {lm_width} wide: a projector of another model size")
    lm_name, proj_name = field(lm, "general.basename"), field(proj, "general.basename")
    if lm_name and proj_name and lm_name != proj_name:
        # Same architecture and width, another name: perhaps a fine-tune's own projector, perhaps a mix-up.
        # The converter writes the same basename into both files of one checkpoint.
        warnings.warn(f"{mmproj_path.name} was converted from {proj_name!r} but {model_path.name} from "
                      f"{lm_name!r}: is the projector from another model?", stacklevel=3)
    name = str(model)[len(ollama.PREFIX):] if ollama.is_ollama_name(model) else model_path.stem
    return GGUFPair(model_path, mmproj_path, lm, proj, family, name)
