"""Model zoo and cost accounting: logistic regression, MLP and a small CNN."""

from hetfl.models.zoo import CNN, MLP, LogisticRegression, build_model
from hetfl.models.cost import flops_per_sample, model_bytes

__all__ = ["CNN", "MLP", "LogisticRegression", "build_model", "flops_per_sample", "model_bytes"]
