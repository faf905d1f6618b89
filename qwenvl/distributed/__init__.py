"""Tensor parallelism: the language model split over N processes (`LLM(..., tensor_parallel_size=N)`).

  comm.py    one group's collectives on its own gloo (CPU) / NCCL (CUDA) backend
  layers.py  column/row-parallel linears, vocabulary-parallel embedding and head, experts per rank
  shard.py   module swaps on the meta model, then strict loading of only this rank's slices
  worker.py  ranks 1..N-1: load, then repeat each step rank 0 sends
  group.py   rank 0: spawn and stop the workers, mirror every forward on them, fail clearly when one dies
"""
