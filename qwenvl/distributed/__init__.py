"""Tensor parallelism (work in progress)."""
