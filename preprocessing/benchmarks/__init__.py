"""Benchmarks of the preprocessing stage: tiling speed per strategy, generator speed and realism."""
