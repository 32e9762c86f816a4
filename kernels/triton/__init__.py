"""Triton kernels for NVIDIA GPUs: KV store, paged decode attention and paged extend attention.

They run on CPU under `TRITON_INTERPRET=1` (set before this package is imported), which is how
their parity tests run without a GPU."""
