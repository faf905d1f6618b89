"""`qwenvl chat` without a question: an interactive session, as `ollama run` has one.

`>>> ` prompt, the answer streamed as it is generated with grounding shown readably (**label** `[box]`),
`/clear` forgets the conversation (the --image/--video files go again with the next question), `/bye` or
Ctrl-D ends. Ctrl-C during an answer stops it and keeps the session; Ctrl-C twice at the prompt ends.
On a terminal the prompt goes to stdout; otherwise to stderr, so piped stdout holds only the answers.
"""

from __future__ import annotations

import sys

from ..answers.readable import ReadableStream

HELP = "commands: /clear (forget the conversation), /bye (end); Ctrl-C stops an answer"


def run_session(llm, params, system: str | None, first_content: list, out=None, err=None, stdin=None) -> int:
    """The read-answer loop. `first_content`: the image/video parts sent with the first question."""
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    print(f"qwenvl chat ({llm.engine.model_name}); {HELP}", file=err, flush=True)
    interrupts = 0
    while True:
        try:
            line = _read(stdin, out, err)
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                print(file=err)
                return 0
            print("\n(Ctrl-C again or /bye to end)", file=err, flush=True)
            continue
        interrupts = 0
        if line is None or line.strip() == "/bye":
            return 0
        question = line.strip()
        if not question:
            continue
        if question == "/clear":
            history = list(base)
            print("[conversation cleared]", file=err, flush=True)
            continue
        if question.startswith("/"):
            print(f"unknown command {question.split()[0]}; {HELP}", file=err, flush=True)
            continue
        content = (first_content if len(history) == len(base) else []) + [{"text": question}]
        answer = _answer(llm, history + [{"role": "user", "content": content}], params, out, err)
        if answer is not None:
            history += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def _read(stdin, out, err) -> str | None:
    """One line, or None at end of input."""
    if stdin.isatty():
        try:
            return input(">>> ")
        except EOFError:
            return None
    print(">>> ", end="", file=err, flush=True)
    line = stdin.readline()
    return line if line else None


def _answer(llm, conversation: list, params, out, err) -> str | None:
    """Stream one answer; None when it was cancelled (Ctrl-C) or refused (the error is printed)."""
    shown = ReadableStream()
    stream = llm.stream(conversation, params)
    last = None
    try:
        for last in stream:
            print(shown.push(last.text), end="", file=out, flush=True)
    except KeyboardInterrupt:
        stream.close()                         # aborts the request in the engine
        print(file=out, flush=True)            # end the partial answer's line
        print("[answer stopped]", file=err, flush=True)
        return None
    except ValueError as e:                    # a prompt the engine refuses (too long, a bad image, ...)
        print(f"error: {e}", file=err, flush=True)
        return None
    tail = shown.push(last.text, final=True) if last else ""
    print(tail, file=out, flush=True)
    if not (last and last.text.strip()):       # an answer of nothing (or only spaces) would look like a hang
        print("(empty answer)", file=err, flush=True)
    return last.text if last else ""
