"""The loader's one error type, in a module of its own so that the loader's helpers (qwenvl/prequantized.py)
can raise it without importing the loader."""


class LoadError(ValueError):
    """A checkpoint folder whose weights do not fit the model; the message names the file and key."""
