"""What a job hands the user: the `PruningResult` (save, push, fast form) and `load_pretrained` for a saved one."""

from .load import load_pretrained
from .result import PruningResult

__all__ = ["PruningResult", "load_pretrained"]
