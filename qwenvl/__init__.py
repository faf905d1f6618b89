"""qwenvl: an open implementation of the Qwen-VL system."""
