"""Model zoo and cost accounting: logistic regression, MLP, a small CNN, and TinyLM (transformer.py) with LoRA and pruning."""

from hetfl.models.zoo import CNN, MLP, LogisticRegression, build_model
from hetfl.models.cost import flops_per_sample, model_bytes

__all__ = ["CNN", "MLP", "LogisticRegression", "build_model", "flops_per_sample", "model_bytes"]
