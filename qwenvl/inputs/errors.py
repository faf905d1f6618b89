"""The one error type of the input pipeline.

A ValueError so that callers who only know Python's builtins still catch it; the server maps it to a 400.
Every message says what was wrong, which value, and what to do about it.
"""


class InputError(ValueError):
    """A request input (message, image, video) we cannot use; the message is safe to show to the client."""
