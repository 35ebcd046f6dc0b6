"""Triton kernels of pyeditor, one module per kernel family (installed as pyeditor.kernels)."""
