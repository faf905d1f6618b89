"""The media files named on the command line, checked before a model loads (loading takes seconds to
minutes; a typo should not wait for it): each local --image / --video exists, and a file given with the
wrong flag (a clip as --image, a picture as --video) is named with the flag it needs."""

from __future__ import annotations

from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".3gp")


def check_media_args(images=(), videos=(), image_flag: str = "--image") -> None:
    """Raise FileNotFoundError / ValueError naming the argument; URLs and in-memory images pass unchecked."""
    for source in images:
        path = _local(source)
        if path is None:
            continue
        _exists(path, image_flag)
        if path.suffix.lower() in VIDEO_SUFFIXES or (path.suffix.lower() != ".pdf" and _is_video(path)):
            raise ValueError(f"{image_flag} {source}: a video file; give it with --video {source}"
                             + ("" if image_flag == "--image" else " to `qwenvl chat`"))
    for source in videos:
        path = _local(source)
        if path is None:
            continue
        _exists(path, "--video")
        if _is_image(path):
            raise ValueError(f"--video {source}: an image file; give it with --image {source}")


def _local(source) -> Path | None:
    if not isinstance(source, str) or "://" in source or source.startswith("data:"):
        return None
    return Path(source).expanduser()


def _exists(path: Path, flag: str) -> None:
    if path.is_dir():
        raise ValueError(f"{flag} {path}: a folder, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file")


def _is_image(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return False


def _is_video(path: Path) -> bool:
    """A file PIL cannot read whose container holds a video stream (a clip without a video suffix)."""
    if _is_image(path):
        return False
    import av
    try:
        with av.open(str(path), mode="r", metadata_errors="ignore") as container:
            return bool(container.streams.video)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError):
        return False
