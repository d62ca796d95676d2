"""Autograd and torch.library layer: one module per op."""
