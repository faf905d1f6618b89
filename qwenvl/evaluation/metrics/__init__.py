"""Per-benchmark scorers, each a transcription of the official script (cited in its module)."""
