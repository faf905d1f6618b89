"""Everything between a user's messages and the model's input: images, pixels, tokens, M-RoPE positions."""

from .admission import AdmissionPolicy, Admitted, MediaRef, admit
from .errors import InputError
from .images import load_image
from .messages import Conversation, normalize_messages
from .mrope import VisionSpan, mrope_positions
from .preprocess import PreprocessorConfig, preprocess_image, preprocess_video, smart_resize
from .prompt import PromptInputs, VisionItem, build_inputs
from .video import Video, VideoOptions, read_video

__all__ = ["AdmissionPolicy", "Admitted", "Conversation", "InputError", "MediaRef", "admit", "PreprocessorConfig", "PromptInputs", "VisionItem", "VisionSpan", "build_inputs",
           "load_image", "mrope_positions", "normalize_messages", "preprocess_image", "preprocess_video",
           "read_video", "smart_resize", "Video", "VideoOptions"]
