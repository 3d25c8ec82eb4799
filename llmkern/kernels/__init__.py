"""Triton kernels and their launchers (no registration, no autograd)."""
