"""Model names -> a local checkpoint folder: a folder path, or a Hugging Face Hub id (`Org/Name`).

Order (issue 26 part 3): a local folder of that name wins; then the local Hub cache (`HF_HUB_CACHE`, else
`HF_HOME/hub`); then, unless `HF_HUB_OFFLINE=1`, a download of only the files qwenvl reads. The cache
location and the offline switch are read at call time, not when huggingface_hub was imported, so a
process (or a test) that sets them late is still obeyed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What the loader, tokenizer and preprocessor read; everything else in a repo (other weight formats,
# ONNX exports, READMEs, images) is never fetched.
NEEDED_FILES = [
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template*", "*.safetensors", "*.safetensors.index.json",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither a folder nor a Hub id we can find; the message says what to do."""


def is_hub_id(name: str) -> bool:
    """`Org/Name` with Hub-legal characters; `./x`, `/abs/path` and `a/b/c` are paths, not ids."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def resolve_model(name: str | Path, revision: str | None = None) -> Path:
    """A checkpoint folder for `name`; raises ModelNotFoundError naming the fix when there is none."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(str(name)):
        raise ModelNotFoundError(f"model {str(name)!r}: no such folder, and not a Hugging Face Hub id (Org/Name)")
    cached = _cached_snapshot(str(name), revision)
    if cached is not None:
        return cached
    if hub_offline():
        raise ModelNotFoundError(_not_cached_message(str(name), revision))
    return _download(str(name), revision)


def _complete(folder: Path) -> bool:
    """A snapshot may hold only a file or two fetched by another tool; we need a config and weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(),
                                        allow_patterns=NEEDED_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    return folder if _complete(folder) else None


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch only NEEDED_FILES into the Hub cache, with huggingface_hub's own progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(),
                                        allow_patterns=NEEDED_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelNotFoundError(f"could not download {repo_id!r}"
                                 f"{f' at revision {revision!r}' if revision else ''} from the Hugging Face Hub: "
                                 f"{type(e).__name__}: {e}") from None
    if not _complete(folder):
        raise ModelNotFoundError(f"{repo_id!r} on the Hub has no config.json or no *.safetensors weights "
                                 "that qwenvl can load")
    return folder


def _not_cached_message(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"model {repo_id!r}{f' revision {revision!r}' if revision else ''} is not in the local Hugging Face "
            f"cache ({hub_cache_dir()}) and HF_HUB_OFFLINE=1 forbids downloading it. On a machine with network "
            f"run `hf download {repo_id}{rev} --include " + " ".join(f"'{p}'" for p in NEEDED_FILES) +
            "` (or unset HF_HUB_OFFLINE), or pass a local checkpoint folder instead.")
