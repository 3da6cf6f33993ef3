"""Synthetic SemanticKITTI-format data: a simulated HDL-64E ray-cast against procedural streets."""
from .generate import generate_dataset

__all__ = ["generate_dataset"]
