"""The R³V engine: examples and packing, sampling, the sample pool, task builders, training,
evaluation and the self-training loop (DESIGN.md §1–§3)."""
