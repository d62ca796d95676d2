"""Triton kernels (``@triton.jit`` functions and their launchers) and their launch heuristics only."""
