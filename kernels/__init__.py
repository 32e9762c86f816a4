"""Compute kernels: attention over the paged KV cache, norms, rotary, activations."""
