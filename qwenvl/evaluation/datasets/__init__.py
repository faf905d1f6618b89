"""Loaders for each benchmark's official release format, from a local folder (no downloads).

Each module has ``load(data_dir) -> list[Sample]`` and ``EXPECTED`` (which files, where they come
from). A loader that cannot find its files raises ``DatasetError`` with that text.
"""

import base64
import importlib
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    id: object            # echoed as the record's id
    messages: list        # OpenAI-style chat messages, images as file:// or data: URLs
    record: dict          # the scorer record minus "prediction" (benchmark, answers, options, ...)


NAMES = ("docvqa", "chartqa", "textvqa", "ai2d", "mmmu", "mathvista", "mmbench_cn")
_MODULES = {"docvqa": "docvqa", "chartqa": "chartqa", "textvqa": "textvqa", "ai2d": "ai2d",
            "mmmu": "mmmu", "mathvista": "mathvista", "mmbench_cn": "mmbench"}


def get_loader(name: str):
    if name not in _MODULES:
        raise DatasetError(f"unknown benchmark {name!r} (expected one of {', '.join(NAMES)})")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def load(name: str, data_dir: str) -> list[Sample]:
    loader = get_loader(name)
    if not Path(data_dir).is_dir():
        raise DatasetError(f"{name}: data folder {data_dir} does not exist.\n{loader.EXPECTED}")
    return loader.load(Path(data_dir))


def missing(name: str, expected: str, detail: str) -> DatasetError:
    return DatasetError(f"{name}: {detail}\n{expected}")


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()


def data_url(raw: bytes) -> str:
    mime = "image/png"
    if raw[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif raw[:4] == b"GIF8":
        mime = "image/gif"
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        mime = "image/webp"
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def user_message(images: list[str], text: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


# The prompts of the Qwen-VL evaluations as VLMEvalKit's Qwen-VL / Qwen2-VL wrappers build them.
SHORT_ANSWER = "Answer the question using a single word or phrase."


def vqa_prompt(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER}"


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    return prompt + "Please select the correct answer from the options above."


def read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()
