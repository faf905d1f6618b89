"""The Gradio Blocks demo and its mounting at `/` of the server's FastAPI app (one process, one engine).

The UI drives the server's AsyncEngine directly (prepare, then stream `generate`); it never calls the
HTTP API. State per browser tab is a list of `Turn`s; the chatbot is redrawn from it on every change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..answers.reasoning import split_reasoning
from ..structured.tool_parser import parse_tool_calls
from .chat import ChatSession, Limits, Options, Turn, readable
from .examples import EXAMPLES_DIR, examples

log = logging.getLogger("qwenvl.web")

TITLE = "qwenvl"
BUNDLED_NAME = "qwenvl-bundled"     # EngineInfo.model_name of the bundled demonstration model
CSS = """
#qwenvl-header {margin-bottom: 0}
#qwenvl-chat .user img {max-height: 160px !important; width: auto !important}
#qwenvl-chat .bot img {max-height: 320px !important; width: auto !important}
#qwenvl-chat button[aria-label="Share"] {display: none}
"""


def render(turns: list[Turn]) -> list[dict]:
    """Chatbot messages (Gradio 'messages' format) for the turns: images then text for the user; the
    readable answer, then the annotated images, for the model; errors as a warning line."""
    out = []
    for turn in turns:
        content = [{"path": p} for p in turn.images] + ([turn.text] if turn.text else [])
        if content:
            out.append({"role": "user", "content": content})
        if turn.error:
            out.append({"role": "assistant", "content": f"⚠️ {turn.error}"})
            continue
        split = split_reasoning(turn.answer, turn.reasoning_opened)
        content, calls = parse_tool_calls(split.content) if turn.done else (split.content, [])
        answer = "\n\n".join([readable(content or "")] + [_call_line(c) for c in calls]).strip() \
            or ("…" if not turn.done else "(empty answer)")
        if split.reasoning:      # a Thinking model's reasoning, folded above its answer
            answer = f"<details><summary>Reasoning</summary>\n\n{split.reasoning}\n\n</details>\n\n{answer}"
        out.append({"role": "assistant", "content": [answer] + [{"path": p} for p in turn.annotated]})
    return out


def _call_line(call) -> str:
    """A tool call shown as a call: the function and its JSON arguments, not the raw <tool_call> block."""
    return f"🔧 **{call.name}**`({call.arguments})`"


def header(model_name: str, device: str, dtype: str) -> str:
    return (f"## {TITLE} — vision-language chat\n"
            f"Model **{model_name}** on **{device}** ({dtype}). Attach one or more images, ask about them; "
            "answers stream as they are generated, and boxes the model names are drawn on the image.")


def build_blocks(session: ChatSession, model_name: str, device: str, dtype: str, max_tokens_cap: int,
                 bundled_model: bool = False):
    import gradio as gr

    with gr.Blocks(title=f"{TITLE} — {model_name}", analytics_enabled=False) as demo:
        ui = _layout(gr, model_name, device, dtype, max_tokens_cap, bundled_model)
        _wire(ui, _Handlers(gr, session, n_buttons=len(ui.buttons)))
    return demo


@dataclass
class _UI:
    turns: object
    chatbot: object
    box: object
    retry: object
    undo: object
    clear: object
    settings: list                   # temperature, top-p, max tokens, high resolution

    @property
    def buttons(self) -> list:
        return [self.retry, self.undo, self.clear]


def _layout(gr, model_name: str, device: str, dtype: str, max_tokens_cap: int, bundled_model: bool) -> _UI:
    gr.Markdown(header(model_name, device, dtype), elem_id="qwenvl-header")
    turns = gr.State([])
    # Half the window's height, not a fixed 640 px: at 1280 x 900 a 640 px chat pushed the input and the
    # examples below the fold, and the page opened scrolled to the focused input with the title cut off.
    chatbot = gr.Chatbot(elem_id="qwenvl-chat", height="50vh", show_label=False, feedback_options=None,
                         buttons=["copy"], placeholder="Attach an image and ask a question.")
    box = gr.MultimodalTextbox(elem_id="qwenvl-input", file_types=["image", "video", ".pdf"], file_count="multiple",
                               placeholder="Ask about images, a video or a PDF (attach with the clip, or drop them here)",
                               show_label=False, autofocus=True)
    found = examples(bundled_model=bundled_model)
    if found:     # right under the input: on the first screen with the title and the box they fill
        gr.Examples(examples=[[{"text": prompt, "files": [path]}] for _, path, prompt in found],
                    example_labels=[label for label, _, _ in found], inputs=[box], label="Examples",
                    elem_id="qwenvl-examples")
    with gr.Row():
        retry = gr.Button("Retry", elem_id="qwenvl-retry", size="sm")
        undo = gr.Button("Undo", elem_id="qwenvl-undo", size="sm")
        clear = gr.Button("Clear", elem_id="qwenvl-clear", size="sm")
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_tokens = gr.Slider(1, max_tokens_cap, value=min(256, max_tokens_cap), step=1,
                                   label="Max new tokens")
            high_res = gr.Checkbox(value=False, label="High resolution",
                                   info="up to 16,384 vision tokens per image instead of 1,280 "
                                   "(within the model's own limit)")
    return _UI(turns, chatbot, box, retry, undo, clear, [temperature, top_p, max_tokens, high_res])


class _Handlers:
    """The page's event handlers; each streams (input box, chatbot, turns, *buttons) updates."""

    def __init__(self, gr, session: ChatSession, n_buttons: int):
        self.gr, self.session, self.n_buttons = gr, session, n_buttons

    def idle(self, busy: bool) -> list:
        """Input and buttons locked while an answer streams (one request per tab at a time)."""
        gr = self.gr
        return [gr.update(value=None, interactive=not busy)] + [gr.update(interactive=not busy)] * self.n_buttons

    def unchanged(self, state) -> tuple:
        return (self.gr.update(), render(state), state, *[self.gr.update()] * self.n_buttons)

    async def stream(self, state: list[Turn], t, p, n, hr):
        options = Options(temperature=t, top_p=p, max_tokens=int(n), high_resolution=bool(hr))
        box_up, *buttons_up = self.idle(True)
        async for _ in self.session.respond(state, options):
            yield (box_up, render(state), state, *buttons_up)
        box_up, *buttons_up = self.idle(False)
        yield (box_up, render(state), state, *buttons_up)

    async def send(self, message, state, t, p, n, hr):
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        files = [f for f in files if f]
        if not text and not files:
            yield self.unchanged(state)
            return
        async for item in self.stream(list(state) + [Turn(text=text, images=files)], t, p, n, hr):
            yield item

    async def retry(self, state, t, p, n, hr):
        if not state:
            yield self.unchanged(state)
            return
        last = state[-1]
        async for item in self.stream(list(state[:-1]) + [Turn(text=last.text, images=list(last.images))],
                                      t, p, n, hr):
            yield item

    @staticmethod
    def undo(state):
        state = list(state[:-1])
        return render(state), state


def _wire(ui: _UI, on: _Handlers) -> None:
    outputs = [ui.box, ui.chatbot, ui.turns, *ui.buttons]
    ui.box.submit(on.send, [ui.box, ui.turns, *ui.settings], outputs, concurrency_limit=None)
    ui.retry.click(on.retry, [ui.turns, *ui.settings], outputs, concurrency_limit=None)
    ui.undo.click(on.undo, [ui.turns], [ui.chatbot, ui.turns], queue=False)
    ui.clear.click(lambda: ([], []), None, [ui.chatbot, ui.turns], queue=False)
    ui.chatbot.clear(lambda: [], None, [ui.turns], queue=False)          # the chatbot's own trash icon


# Gradio's event queue polls the event loop every 1 ms when it has nothing to do (10 ms for progress
# updates): an idle `qwenvl serve` used 6% of a core for it, and under API load every poll takes the GIL
# from the loop that streams tokens. 50 ms / 100 ms (Gradio's own values on Windows) delay a web chat's
# start by at most 50 ms, which nobody sees.
QUEUE_POLL_S, PROGRESS_POLL_S = 0.05, 0.1


def calm_queue_polling(demo) -> None:
    """Slow the demo's queue polling to QUEUE_POLL_S / PROGRESS_POLL_S (Gradio has no public setting for it;
    tests/test_web_queue_polling.py fails if a Gradio release renames these attributes)."""
    queue = getattr(demo, "_queue", None)
    for name, value in (("sleep_when_free", QUEUE_POLL_S), ("progress_update_sleep_when_free", PROGRESS_POLL_S)):
        if queue is not None and hasattr(queue, name):
            setattr(queue, name, max(getattr(queue, name), value))


def mount(app) -> None:
    """The server's `mount_ui` hook: build the demo over `app.state.qwenvl` and mount it at `/`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from .auth import WebAuthGate

    state = app.state.qwenvl
    engine = state.engine
    info = engine.info()
    s = state.settings
    limits = Limits(policy=state.policy, max_model_len=state.max_model_len)    # exactly the APIs' limits
    device, dtype = info.device, info.dtype
    cap = min(s.default_max_tokens, state.max_model_len or s.default_max_tokens)
    demo = build_blocks(ChatSession(engine, limits), state.model_name, device, dtype, cap,
                        bundled_model=info.model_name == BUNDLED_NAME)
    demo.queue(default_concurrency_limit=None, max_size=s.max_queue)
    calm_queue_polling(demo)
    allowed = [str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else []
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])   # no web fonts: works offline
    gr.mount_gradio_app(app, demo, path="/", footer_links=[], run_history=False, allowed_paths=allowed,
                        max_file_size=s.max_image_bytes, show_error=False, ssr_mode=False, mcp_server=False,
                        theme=theme, css=CSS)
    if state.api_key:
        app.add_middleware(WebAuthGate, api_key=state.api_key, open_prefixes=state.api_prefixes,
                           open_paths=("/health", "/metrics", "/openapi.json"))    # the server checks /metrics
    log.info("web UI mounted at / (%s)", "sign-in with the API key" if state.api_key else "no auth")
