"""Local training and its cost."""

from hetfl.training.local import LocalResult, LocalTrainer, flatten_parameters

__all__ = ["LocalResult", "LocalTrainer", "flatten_parameters"]
