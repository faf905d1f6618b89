"""The one error type of GGUF loading, in a module of its own so that every GGUF module can raise it."""

from ..load_error import LoadError


class GGUFError(LoadError):
    """A GGUF file (or pair of files) qwenvl cannot load; the message names the file and what is wrong."""
