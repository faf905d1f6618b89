"""Fine-tuning: packed SFT (full or LoRA), tokenizer training, checkpoints a `LLM(folder)` loads. A front end:
imports the engine and the rooms below it, never the server, web or evaluation."""
