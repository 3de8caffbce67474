"""The R³V engine: examples and packing, sampling, the sample pool, task builders, training,
evaluation, the run directory and the self-training loop (docs/architecture.md)."""
