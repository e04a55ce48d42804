"""What is pruned: a model's prunable layers (`find_units`), its attention/FFN groups (`find_structured_groups`),
sparsity levels and patterns, loading with safetensors only, and the dense weights kept on disk."""

from .groups import StructuredGroup, find_structured_groups
from .loading import load_model_and_tokenizer
from .units import Unit, find_units

__all__ = ["StructuredGroup", "Unit", "find_structured_groups", "find_units", "load_model_and_tokenizer"]
