"""Evaluation: scorers faithful to the official ones, loaders for the official release formats,
a resumable runner and the report against the seed's published table.

`qwenvl eval score FILE.jsonl` -> `score.score_file`; `qwenvl eval run ...` -> `runner.run_benchmark`.
"""
