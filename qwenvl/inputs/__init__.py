"""Everything between a user's messages and the model's input: images, pixels, tokens, M-RoPE positions."""

from .errors import InputError
from .images import load_image
from .preprocess import PreprocessorConfig, smart_resize

__all__ = ["InputError", "PreprocessorConfig", "load_image", "smart_resize"]
