"""`predict(messages) -> str` callables: a local model, an OpenAI-compatible endpoint, DashScope."""

import base64
import mimetypes
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

DASHSCOPE_ROUTE = "/api/v1/services/aigc/multimodal-generation/generation"


def local_predictor(model_dir: str | None = None, max_tokens: int = 512, quantization: str | None = None,
                    device: str = "auto", revision: str | None = None):
    """Runs qwenvl's own engine (`model_dir`: a folder or a Hub id, as `qwenvl chat --model`); the model is loaded
    on first use. Calls are serialised (one engine)."""
    state = {}
    lock = threading.Lock()

    def predict(messages: list) -> str:
        with lock:
            if "llm" not in state:
                from qwenvl import LLM, SamplingParams
                state["llm"] = LLM(model_dir, quantization=quantization, device=device, revision=revision)
                state["params"] = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            return state["llm"].chat(messages, state["params"]).text

    return predict


def _inline(url: str) -> str:
    """file:// URLs become data: URLs, since a remote server cannot read our disk."""
    if not url.startswith("file://"):
        return url
    path = Path(unquote(urlparse(url).path))
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _inline_messages(messages: list) -> list:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": _inline(p["image_url"]["url"])}}
                       if p.get("type") == "image_url" else p for p in content]
        out.append({**m, "content": content})
    return out


def openai_predictor(endpoint: str, model: str | None = None, api_key: str | None = None,
                     max_tokens: int = 512, timeout: float = 600.0, http_client=None):
    import openai

    client = openai.OpenAI(base_url=endpoint, api_key=api_key or "EMPTY", timeout=timeout, max_retries=3,
                           http_client=http_client)
    state = {"model": model}

    def predict(messages: list) -> str:
        if not state["model"]:
            state["model"] = client.models.list().data[0].id
        out = client.chat.completions.create(model=state["model"], messages=_inline_messages(messages),
                                             temperature=0.0, max_tokens=max_tokens)
        return out.choices[0].message.content or ""

    return predict


def to_dashscope(messages: list) -> list:
    out = []
    for m in _inline_messages(messages):
        content = m["content"]
        if isinstance(content, str):
            parts = [{"text": content}]
        else:
            parts = [{"image": p["image_url"]["url"]} if p.get("type") == "image_url" else {"text": p["text"]}
                     for p in content]
        out.append({"role": m["role"], "content": parts})
    return out


def dashscope_predictor(endpoint: str, model: str | None = None, api_key: str | None = None,
                        max_tokens: int = 512, timeout: float = 600.0, retries: int = 3, http_client=None):
    import httpx

    # The base URL may be given as DashScope's docs spell it (".../api/v1") or bare ("http://host:port").
    url = endpoint.rstrip("/")
    if not url.endswith("/generation"):
        url = url.removesuffix("/api/v1") + DASHSCOPE_ROUTE
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    client = http_client or httpx.Client(timeout=timeout)

    def predict(messages: list) -> str:
        body = {"model": model or "qwen-vl-max", "input": {"messages": to_dashscope(messages)},
                "parameters": {"temperature": 0.0, "max_tokens": max_tokens}}
        for attempt in range(retries + 1):
            r = client.post(url, json=body, headers=headers)
            if r.status_code in (429, 500, 502, 503, 504) and attempt < retries:
                time.sleep(2 ** attempt)
                continue
            break
        data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200:
            raise RuntimeError(f"DashScope {url} answered {r.status_code}: "
                               f"{data.get('code', '')} {data.get('message', r.text[:200])}")
        content = data["output"]["choices"][0]["message"]["content"]
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content)
        return content

    return predict
