"""Validated experiment configuration.

Every input a run takes passes through :class:`ExperimentConfig` once, here; the code
behind it trusts what it receives. An unknown key or a value of the wrong type is a
:class:`~hetfl.errors.ConfigError` whose one-line message names the key.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from hetfl import registry
from hetfl.errors import ConfigError


MAX_AVAILABILITY_PERIODS = 100_000


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data
class PartitionConfig(Section):
    kind: str = Field(
        "iid",
        description="How samples are dealt to clients: iid, dirichlet (label skew), shards, quantity (power-law sizes), "
        "natural (groups), embedding (Dirichlet over k-means clusters of sample embeddings); or a partitioner of your "
        "own, package.module:function, called as f(labels, n_clients, rng, **params) (docs/extending.md).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of a partitioner given by import path (kind)."
    )
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration over classes, or over clusters for embedding (smaller: more skew)."
    )
    classes_per_client: int = Field(2, ge=1, description="Shards: distinct classes per client.")
    exponent: float = Field(1.5, gt=0, description="Quantity skew: power-law exponent of client sizes.")
    min_size: int = Field(2, ge=1, description="Smallest number of samples a client may get.")
    n_clusters: int = Field(10, ge=1, description="Embedding: number of k-means clusters the embeddings are grouped into.")
    embedding_dim: int = Field(
        16,
        ge=1,
        description="Embedding: without `embeddings`, samples are embedded by standardising their features and keeping "
        "this many principal components (at most the number of features); no pretrained encoder is used.",
    )
    embeddings: str | None = Field(
        None,
        description="Embedding: a local .npy file of shape (n_samples, d), one row per sample in dataset order (e.g. from "
        "a pretrained encoder); clustered as it is, instead of the PCA feature map.",
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: Any) -> str:
        return registry.check_name("partition", value)

    @model_validator(mode="after")
    def _embedding_keys(self) -> "PartitionConfig":
        if self.params and registry.is_builtin("partition", self.kind):
            raise ValueError(
                f"data.partition.params: for a partitioner given by import path; '{self.kind}' takes its parameters "
                "from the keys of data.partition (alpha, classes_per_client, ...)"
            )
        if self.embeddings is not None:
            if self.kind != "embedding":
                raise ValueError(f"data.partition.embeddings: used only with kind 'embedding', not '{self.kind}'")
            if not self.embeddings.endswith(".npy"):
                raise ValueError(f"data.partition.embeddings: expected a .npy file, got '{self.embeddings}'")
        return self


class FeatureSkewConfig(Section):
    """Feature distribution skew: a per-client transform of the inputs (see hetfl.data.skew)."""

    kind: Literal["none", "noise", "rotation", "affine"] = Field(
        "none",
        description="Per-client input transform: none, Gaussian noise of a per-client sigma (Li et al. 2021, "
        "arXiv:2102.02079), rotation of image inputs by a per-client angle (rotated-MNIST style), or affine: a "
        "per-client contrast and brightness, x -> (1 + level) x + level (in feature standard deviations), the "
        "feature shift of FedBN (arXiv:2102.07623).",
    )
    strength: float | None = Field(
        None,
        ge=0,
        description="The largest level, required unless kind is none. noise: sigma in units of the feature's standard "
        "deviation over the training samples; rotation: angle in degrees (counter-clockwise); affine: the level l of "
        "x -> (1 + l) x + l, in feature standard deviations. Levels are spread evenly "
        "from 0 to it, one per client, and dealt to clients in a seeded random order.",
    )
    groups: int | None = Field(
        None,
        ge=2,
        description="Use only this many evenly spaced levels (0 to strength), dealt round-robin over the shuffled "
        "clients (e.g. rotation with strength 270 and groups 4: 0, 90, 180, 270 degrees); unset: one level per client.",
    )
    per: Literal["client", "sample"] = Field(
        "client",
        description="client: each client's samples share its level; sample: every sample draws one of the groups' "
        "levels at random, so each client mixes several feature distributions (intra-client heterogeneity, as "
        "FedIns, arXiv:2308.06051, studies); needs groups.",
    )

    @model_validator(mode="after")
    def _strength_needed(self) -> "FeatureSkewConfig":
        if self.kind != "none" and self.strength is None:
            unit = {"noise": "sigma in feature standard deviations", "rotation": "angle in degrees",
                    "affine": "level l of x -> (1 + l) x + l"}[self.kind]
            raise ValueError(f"data.feature_skew.strength: set the largest level for kind '{self.kind}' ({unit})")
        if self.per == "sample" and self.groups is None:
            raise ValueError("data.feature_skew.groups: per: sample draws each sample's level from groups levels; "
                             "set groups (e.g. 4)")
        return self


class DriftConfig(Section):
    """Concept drift: some clients' label mapping changes at a simulated time (see hetfl.data.skew.LabelDrift)."""

    kind: Literal["none", "swap"] = Field(
        "none", description="none, or swap: drifting clients swap `pairs` pairs of classes from time at_s on."
    )
    at_s: float | None = Field(
        None,
        ge=0,
        description="Simulated seconds at which the drift happens (labels change for t >= at_s); required for swap. "
        "Seconds, not rounds: asynchronous algorithms have no rounds, and one clock keeps runs of different "
        "algorithms comparable.",
    )
    clients: float = Field(
        0.5, ge=0, le=1, description="Share of clients that drift (clients * n_clients rounded, halves up; chosen with the seed)."
    )
    pairs: int = Field(
        1, ge=1, description="Swap: disjoint pairs of classes exchanged, chosen with the seed; one permutation for all drifting clients."
    )

    @model_validator(mode="after")
    def _time_needed(self) -> "DriftConfig":
        if self.kind != "none" and self.at_s is None:
            raise ValueError(f"data.drift.at_s: set the simulated time (seconds) of the drift for kind '{self.kind}'")
        return self


class TextConfig(Section):
    """The built-in ``text`` dataset: byte-level language modelling on text that ships with Python (hetfl.data.text)."""

    styles: list[str] = Field(
        default_factory=lambda: ["code", "prose"],
        description="Text styles, dealt to clients round-robin (client i gets styles[i mod len]): code (standard-library "
        "source), prose (the help() topics), legal (LICENSE.txt), mail (the email package's test messages).",
    )
    tokens_per_client: int = Field(
        4096, ge=2, description="Bytes of text each client holds, cut into non-overlapping windows of context + 1 bytes."
    )
    context: int = Field(
        32, ge=1, description="Tokens a sample gives the model (x); y is the same window shifted by one (next bytes)."
    )

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, styles: list[str]) -> list[str]:
        from hetfl.data.text import SOURCES

        if not styles:
            raise ValueError("name at least one style")
        unknown = [s for s in styles if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown style '{unknown[0]}' (known: {', '.join(SOURCES)})")
        return styles

    @model_validator(mode="after")
    def _one_window(self) -> "TextConfig":
        if self.tokens_per_client < 2 * (self.context + 1):
            raise ValueError(
                f"data.text.tokens_per_client: {self.tokens_per_client} bytes make fewer than two windows of context + 1 "
                f"= {self.context + 1} (one to train, one to test); raise it or lower data.text.context"
            )
        return self


class SyntheticConfig(Section):
    """The built-in ``synthetic`` dataset: Synthetic(alpha, beta) of Li et al. (FedProx, arXiv:1812.06127, section 5.1),
    each client's samples generated from (seed, client) when it trains (hetfl.data.synthetic)."""

    alpha: float = Field(
        1.0, ge=0, description="How much the clients' softmax models differ: u_k ~ N(0, alpha), W_k, b_k ~ N(u_k, 1) "
        "(alpha a standard deviation, as in the authors' generator)."
    )
    beta: float = Field(
        1.0, ge=0, description="How much the clients' inputs differ: B_k ~ N(0, beta), v_k ~ N(B_k, 1), x ~ N(v_k, Sigma)."
    )
    size_mean_log: float = Field(4.0, description="Samples per client: floor(LogNormal(size_mean_log, size_sigma_log)) + min_size.")
    size_sigma_log: float = Field(2.0, ge=0, description="Samples per client: sigma of the log-normal (the paper's 2).")
    min_size: int = Field(50, ge=2, description="Samples per client: added to the log-normal draw (the paper's 50).")
    max_size: int | None = Field(
        None, ge=2, description="Samples per client: at most this many (unset: the paper's uncapped heavy tail)."
    )
    eval_clients: int = Field(
        100, ge=1, description="Clients, drawn once with the seed, whose test splits are the evaluation set (at most n_clients)."
    )

    @model_validator(mode="after")
    def _sizes(self) -> "SyntheticConfig":
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"data.synthetic.max_size: {self.max_size} is below min_size={self.min_size}")
        return self


class DataConfig(Section):
    dataset: str = Field(
        "digits",
        description="digits (scikit-learn), text (byte-level language modelling on Python's own text, data.text) and "
        "synthetic (FedProx's Synthetic(alpha, beta), generated per client, data.synthetic) and mnist1d (MNIST-1D, "
        "generated by the mnist1d package, settings in data.params) are built in; mnist, "
        "fashion_mnist, cifar10, leaf, csv, npz and hf (a Hugging Face dataset saved to disk) are read from data.path; "
        "or a loader of your own, package.module:function, called with data.params (docs/extending.md).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of a dataset loader given by import path (dataset); for "
        "mnist1d the generator's settings (num_samples, train_split, seed, ...; hetfl.data.mnist1d)."
    )
    path: str | None = Field(
        None, description="Local file or folder; required for mnist, fashion_mnist, cifar10, leaf, csv, npz and hf; passed "
        "to a loader of your own whose signature has a `path` parameter."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="hf: the feature and label columns, {x: COLUMN, y: COLUMN} (default: the first two columns).",
    )
    label_column: str = Field("label", description="CSV: the column holding the class label.")
    id_column: str | None = Field(None, description="CSV: a column of natural client ids (for partition.kind=natural).")
    n_clients: int = Field(20, ge=1, description="Number of clients the data is partitioned into.")
    partition: PartitionConfig = PartitionConfig()
    feature_skew: FeatureSkewConfig = FeatureSkewConfig()
    drift: DriftConfig = DriftConfig()
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each client's samples kept for its test split.")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of each client's training samples held out as its validation split (not "
        "trained on; evaluation.split: validation scores on it, as hetfl sweep does); 0: none, every training sample "
        "trains.",
    )
    labelled_fraction: float | list[float] = Field(
        1.0, description="Share of each client's training samples whose labels it has (semi-supervised FL, as semipfl "
        "assumes): a number for every client, or a list of one per client (heterogeneous shares). The rest are "
        "unlabelled: their labels are never given to any client (ClientData.x_unlabelled carries their features; only "
        "semi-supervised algorithms read them). Drawn per client, stratified by label, after the validation split; "
        "1: every sample labelled.",
    )
    normalize: bool = Field(True, description="Scale features to zero mean, unit variance (statistics of the training splits).")
    text: TextConfig = TextConfig()
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("dataset", mode="before")
    @classmethod
    def _known_dataset(cls, value: Any) -> str:
        return registry.check_name("dataset", value)

    @field_validator("columns")
    @classmethod
    def _two_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = [k for k in columns if k not in ("x", "y")]
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}'; give the feature column as x and the label column as y")
        return columns

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        builtin = registry.is_builtin("dataset", self.dataset)
        if builtin and self.dataset not in BUILT_IN and not self.path:
            raise ValueError(f"data.path: dataset '{self.dataset}' is read from a local path; set data.path")
        if builtin and self.params and self.dataset == "mnist1d":
            from hetfl.data.mnist1d import check_params

            check_params(self.params)  # the generator's settings, by name (a ValueError naming data.params.<key>)
        elif builtin and self.params:
            raise ValueError(
                f"data.params: for a dataset loader given by import path; '{self.dataset}' takes its settings from "
                "the keys of data (path, label_column, text, synthetic, ...)"
            )
        if self.columns and self.dataset != "hf":
            raise ValueError(f"data.columns: only for dataset hf, not '{self.dataset}'")
        if self.dataset == "text":
            if "kind" not in self.partition.model_fields_set:
                self.partition.kind = "natural"  # each client's own corpus: the only partition text has
            elif self.partition.kind != "natural":
                raise ValueError(
                    f"data.partition.kind: the text dataset gives every client its own corpus (natural groups); "
                    f"'{self.partition.kind}' would mix them, use natural"
                )
            if self.drift.kind != "none":
                raise ValueError("data.drift.kind: the text dataset has next-token targets, not classes to swap; set none")
        shares = self.labelled_fraction if isinstance(self.labelled_fraction, list) else [self.labelled_fraction]
        if any(not 0 < f <= 1 for f in shares):
            raise ValueError("data.labelled_fraction: each share must lie in (0, 1] (1: every sample labelled)")
        if isinstance(self.labelled_fraction, list) and len(shares) != self.n_clients:
            raise ValueError(f"data.labelled_fraction: a list needs one share per client ({self.n_clients}), "
                             f"got {len(shares)}")
        if self.dataset in ("synthetic", "text") and any(f < 1 for f in shares):
            raise ValueError(f"data.labelled_fraction: the {self.dataset} dataset has no unlabelled samples to set "
                             "apart; set 1")
        if self.dataset == "synthetic" and self.validation_fraction:
            raise ValueError("data.validation_fraction: the synthetic dataset generates its evaluation clients apart; "
                             "set 0 (hetfl sweep needs a dataset that is dealt out)")
        if self.dataset == "synthetic":
            changed = [k for k, v in PartitionConfig().model_dump().items() if getattr(self.partition, k) != v]
            if changed:  # (compared with the defaults: a resolved config.yaml lists every key)
                key = changed[0]
                raise ValueError(
                    f"data.partition.{key}: the synthetic dataset generates every client's own data (non-IID by "
                    "construction); there is no pool to partition, remove data.partition"
                )
            if self.feature_skew.kind != "none":
                raise ValueError(
                    "data.feature_skew.kind: the synthetic dataset's clients already differ in their inputs "
                    "(data.synthetic.beta); set none"
                )
        return self


BUILT_IN = ("digits", "text", "synthetic", "mnist1d")
"""Built-in datasets that need no data.path."""


# --------------------------------------------------------------------------- devices
class ComputeConfig(Section):
    distribution: Literal["constant", "lognormal", "pareto", "tiers"] = Field(
        "lognormal", description="How relative compute speeds are drawn (pareto: heavy tail of slow devices)."
    )
    median_flops: float = Field(2e9, gt=0, description="FLOP/s of the median device (the reference speed 1.0).")
    sigma: float = Field(0.5, ge=0, description="Log-normal: standard deviation of log speed.")
    pareto_shape: float = Field(1.5, gt=0, description="Pareto: tail index (smaller: heavier tail of slow devices).")
    tiers: dict[str, float] = Field(
        default_factory=lambda: {"low": 0.3, "mid": 1.0, "high": 3.0},
        description="Tiers: relative speed of each named tier.",
    )
    tier_weights: dict[str, float] | None = Field(None, description="Tiers: share of clients in each tier (default equal).")

    @model_validator(mode="after")
    def _tiers_consistent(self) -> "ComputeConfig":
        if self.distribution == "tiers" and not self.tiers:
            raise ValueError("devices.compute.tiers: at least one tier is needed for distribution 'tiers'")
        bad = [name for name, speed in self.tiers.items() if speed <= 0]
        if bad:
            raise ValueError(f"devices.compute.tiers: speed of tier '{bad[0]}' must be positive")
        if self.tier_weights is not None:
            _check_weights(self.tier_weights, "devices.compute.tier_weights", known=self.tiers)
        return self


def _check_weights(weights: dict[str, float], key: str, known) -> None:
    unknown = [name for name in weights if name not in known]
    if unknown:
        raise ValueError(f"{key}: unknown tier '{unknown[0]}' (known: {', '.join(known)})")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"{key}: weights must be non-negative and not all zero")


class NetworkConfig(Section):
    tiers: dict[str, float] = Field(
        default_factory=lambda: {"4g": 0.3, "wifi": 0.5, "ethernet": 0.2},
        description="Share of clients on each bandwidth tier (names from hetfl.devices.NETWORK_TIERS).",
    )

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, tiers: dict[str, float]) -> dict[str, float]:
        from hetfl.devices.tiers import NETWORK_TIERS

        _check_weights(tiers, "devices.network.tiers", known=NETWORK_TIERS)
        return tiers


class AvailabilityConfig(Section):
    kind: Literal["always", "markov"] = Field(
        "always", description="always online, or alternating exponential online/offline periods (markov)."
    )
    mean_online_s: float = Field(3600.0, gt=0, description="Markov: mean length of an online period (s).")
    mean_offline_s: float = Field(600.0, gt=0, description="Markov: mean length of an offline period (s).")
    horizon_s: float = Field(7 * 24 * 3600.0, gt=0, description="Availability windows are drawn up to this time.")

    @model_validator(mode="after")
    def _not_too_many_periods(self) -> "AvailabilityConfig":
        periods = 2 * self.horizon_s / (self.mean_online_s + self.mean_offline_s)
        if self.kind == "markov" and periods > MAX_AVAILABILITY_PERIODS:
            raise ValueError(
                f"devices.availability: on/off periods of {self.mean_online_s:g} s + {self.mean_offline_s:g} s over "
                f"horizon_s={self.horizon_s:g} make {periods:,.0f} periods per client; raise the means (seconds) "
                f"or lower horizon_s (at most {MAX_AVAILABILITY_PERIODS:,} periods)"
            )
        return self


class MemoryConfig(Section):
    """Each device's memory, the limit of what it can train (strategies that size a model per device read it)."""

    limit: float | None = Field(
        None, gt=0, description="Memory of every device in bytes; unset: unlimited. Applies to trace devices too."
    )
    tiers: dict[str, float] = Field(
        default_factory=dict,
        description="Memory in bytes by compute tier (devices.compute.distribution: tiers), e.g. {low: 64e6, mid: 256e6, "
        "high: 1e9}; a tier not listed gets limit. Device traces carry no memory column.",
    )

    @field_validator("tiers")
    @classmethod
    def _positive(cls, tiers: dict[str, float]) -> dict[str, float]:
        bad = [name for name, value in tiers.items() if not value > 0]
        if bad:
            raise ValueError(f"devices.memory.tiers: memory of tier '{bad[0]}' must be a positive number of bytes")
        return tiers


class ByzantineConfig(Section):
    """Simulated attackers: some clients return a corrupted model instead of their training result
    (hetfl.devices.byzantine). Simulation only: it tests robust aggregation (strategy.aggregator)."""

    fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of clients that are Byzantine (fraction * n_clients rounded, halves up; chosen "
        "with the seed, fixed for the run); 0: none."
    )
    attack: Literal["sign_flip", "scaled_random", "backdoor"] = Field(
        "sign_flip",
        description="What an attacker returns, with d its honest change (trained model minus the model it started from): "
        "sign_flip: start - scale * d; scaled_random: start + a Gaussian direction of length scale * ||d|| (seeded by task); "
        "backdoor: start + scale * d, d trained on its data with a trigger stamped on a share of it, relabelled "
        "target (model replacement, Bagdasaryan et al., arXiv:1807.00459).",
    )
    scale: float = Field(
        10.0, gt=0, description="Strength of the attack (see attack); backdoor: the boost gamma (the paper's n / eta, "
        "e.g. clients_per_round for FedAvg; 1: no boost)."
    )
    target: int = Field(0, ge=0, description="backdoor: the class that trigger-stamped samples are relabelled to.")
    poison_frac: float = Field(
        0.5, gt=0, le=1, description="backdoor: the share of each attacker's training samples stamped and relabelled "
        "(chosen with the seed, fixed for the run)."
    )
    trigger_size: int = Field(
        4, ge=1, description="backdoor: the trigger sets a sample's last trigger_size features (flattened; the last "
        "pixels of an image) to the dataset's largest feature value."
    )


class DevicesConfig(Section):
    trace: str | None = Field(None, description="CSV or JSON device trace; overrides the distributions below.")
    compute: ComputeConfig = ComputeConfig()
    network: NetworkConfig = NetworkConfig()
    availability: AvailabilityConfig = AvailabilityConfig()
    memory: MemoryConfig = MemoryConfig()
    dropout: float = Field(0.0, ge=0, lt=1, description="Probability that a client never returns a task.")
    jitter: float = Field(0.1, ge=0, description="Per-task log-normal noise (sigma) on compute and network time.")
    byzantine: ByzantineConfig = ByzantineConfig()

    @model_validator(mode="after")
    def _memory_tiers_known(self) -> "DevicesConfig":
        if self.memory.tiers and (self.trace or self.compute.distribution != "tiers"):
            raise ValueError(
                "devices.memory.tiers: memory by tier needs devices.compute.distribution: tiers (and no trace); "
                "use devices.memory.limit for every device"
            )
        unknown = [name for name in self.memory.tiers if name not in self.compute.tiers]
        if unknown:
            raise ValueError(
                f"devices.memory.tiers: unknown compute tier '{unknown[0]}' (known: {', '.join(self.compute.tiers)})"
            )
        return self


# --------------------------------------------------------------------------- model and training
class ArchitectureConfig(Section):
    """One architecture: which model and its sizes."""

    name: str = Field(
        "mlp",
        description="Model architecture: logreg, mlp, cnn, cnn1d (a 1-d CNN of signals, e.g. mnist1d), resnet (a "
        "CIFAR ResNet with BatchNorm; minutes an epoch of CIFAR-10 on a CPU), tinylm (a tiny decoder-only transformer, for data.dataset "
        "text); or a torch.nn.Module of your own, package.module:Class (or a function returning a module), called with "
        "model.params and, where its signature asks, input_shape, n_classes, vocab_size, feature_dim "
        "(docs/extending.md).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of a model given by import path (name)."
    )
    hidden: list[int] = Field(default_factory=lambda: [64], description="MLP: hidden layer widths.")
    channels: list[int] | None = Field(
        None,
        description="cnn, cnn1d: channels of each conv block; resnet: of each stage. Unset: the model's own, cnn [16, "
        "32], cnn1d [32, 32, 32], resnet [16, 32, 64] (the CIFAR ResNet).",
    )
    blocks: int = Field(1, ge=1, description="resnet: residual blocks per stage (three stages: ResNet-(6 blocks + 2)).")
    d_model: int = Field(32, ge=1, description="TinyLM: width of the embeddings and the residual stream.")
    n_heads: int = Field(4, ge=1, description="TinyLM: attention heads per layer (must divide d_model).")
    d_ff: int = Field(64, ge=1, description="TinyLM: hidden channels of each feed-forward layer.")
    n_layers: int = Field(2, ge=1, description="TinyLM: transformer blocks (its context is data.text.context).")
    prompt_tokens: int = Field(
        0, ge=0, description="TinyLM: rows of a learned soft prompt prepended to every input (the prompt that "
        "pfedpg personalises); 0: none.",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _known_model(cls, value: Any) -> str:
        return registry.check_name("model", value)

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("every width must be a positive integer")
        return value

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArchitectureConfig":
        if self.name == "tinylm" and self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads: {self.n_heads} heads must divide d_model ({self.d_model})")
        if self.params and registry.is_builtin("model", self.name):
            raise ValueError(
                f"model.params: for a model given by import path; '{self.name}' takes its sizes from the keys of "
                "model (hidden, channels, d_model, ...)"
            )
        return self

    def label(self) -> str:
        """A short name: ``mlp[64]``, ``cnn[16,32]``, ``logreg``, ``tinylm[d32,h4,f64,l2]``; a model of one's own is
        its import path with its parameters, ``mymodels:ResNet(width=16)``."""
        if not registry.is_builtin("model", self.name):
            args = ",".join(f"{k}={v}" for k, v in self.params.items())
            return f"{self.name}({args})" if args else self.name
        if self.name == "tinylm":
            return f"tinylm[d{self.d_model},h{self.n_heads},f{self.d_ff},l{self.n_layers}]"
        if self.name in ("cnn", "cnn1d", "resnet"):
            channels = self.channels
            if channels is None:  # the factory's own default
                factory = registry.resolve("model", self.name, key="model.name").obj
                channels = inspect.signature(factory).parameters["channels"].default
            blocks = f"x{self.blocks}" if self.name == "resnet" else ""
            return f"{self.name}[{','.join(map(str, channels))}]{blocks}"
        return f"mlp[{','.join(map(str, self.hidden))}]" if self.name == "mlp" else self.name


class PretrainConfig(Section):
    """How the pretrained TinyLM base (``model.pretrained``) is made; see hetfl.models.pretrain."""

    steps: int = Field(600, ge=1, description="Optimiser steps (Adam) on the pretraining corpus.")
    batch_size: int = Field(32, ge=1, description="Windows per pretraining step.")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of pretraining.")
    seed: int = Field(0, description="Seeds the base model's initialisation and the pretraining batches.")
    cache_dir: str | None = Field(
        None,
        description="Folder of cached pretrained weights (one file per model sizes, corpus and settings); unset: "
        "$HETFL_CACHE, else ~/.cache/hetfl.",
    )


class ModelConfig(ArchitectureConfig):
    """The federation's reference architecture (``name``, ``hidden``, ``channels``) and, optionally, a zoo.

    Without ``zoo`` every client trains the reference architecture. With it, each client trains one of
    the zoo's architectures, chosen by ``assign``; only model-heterogeneous algorithms accept that
    (``hetfl algorithms`` marks them). The reference architecture remains the server's model where an
    algorithm has one (FML's shared model).
    """

    feature_dim: int | None = Field(
        None,
        ge=1,
        description="Width of the representation every architecture hands its classifier head; a layer of this width "
        "(Linear + ReLU; linear for logreg) ends the body where it would otherwise differ. Model-heterogeneous "
        "algorithms that share heads, prototypes or adapters need one width across the zoo.",
    )
    zoo: list[ArchitectureConfig] = Field(
        default_factory=list,
        description="Client architectures (smallest first for assign: speed), e.g. [{name: logreg}, {name: mlp, "
        "hidden: [32]}, {name: cnn}]; empty: every client trains the reference architecture.",
    )
    assign: Literal["speed", "tier", "cycle", "explicit"] = Field(
        "speed",
        description="How clients get a zoo architecture: speed (clients ranked by compute speed, split into equal "
        "groups, slowest to zoo[0]), tier (devices.compute tier name -> zoo index in `tiers`), cycle (client i gets "
        "zoo[i mod len]), explicit (`assignment`).",
    )
    tiers: dict[str, int] = Field(
        default_factory=dict, description="assign: tier: zoo index of each devices.compute tier, e.g. {low: 0, mid: 1, high: 2}."
    )
    assignment: list[int] | None = Field(None, description="assign: explicit: the zoo index of every client, in client order.")
    pretrained: bool = Field(
        False,
        description="TinyLM: start from a base pretrained in-project on a style-mixed corpus of Python's own text, "
        "disjoint from the clients' text (model.pretrain; cached on disk, so only the first run pays for it).",
    )
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _zoo_consistent(self) -> "ModelConfig":
        k = len(self.zoo)
        if self.assign == "tier" and k and not self.tiers:
            raise ValueError("model.tiers: assign 'tier' needs the zoo index of each compute tier, e.g. {low: 0, high: 1}")
        for where, indices in (("model.tiers", list(self.tiers.values())), ("model.assignment", self.assignment or [])):
            bad = [i for i in indices if not 0 <= i < max(k, 1)]
            if bad:
                raise ValueError(f"{where}: zoo index {bad[0]} is out of range (model.zoo has {k} architectures)")
        if self.assign == "explicit" and k and self.assignment is None:
            raise ValueError("model.assignment: assign 'explicit' needs the zoo index of every client")
        if self.pretrained and self.name != "tinylm":
            raise ValueError(f"model.pretrained: only tinylm has a pretrained base; model.name is {self.name}")
        return self


# training.vectorize=auto, from benchmarks/vectorized.py (digits, 100 clients, 10 steps, batch 14, 1 thread, 2 cores):
# train_many against train in a loop is 1.1-1.6x at 4 tasks, 1.2-2.1x at 8, 1.5-3.6x at 16 and 1.8-5.6x at 32
# for MLPs of 4.8k and 85k parameters and a 6k-parameter CNN; a 301k-parameter MLP is 1.15x at 16 tasks and
# 0.58x (slower) at 64.
VECTORIZE_MIN_TASKS = 16
VECTORIZE_MAX_PARAMS = 100_000


class TrainingConfig(Section):
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Local optimiser (a new one each task).")
    lr: float = Field(0.05, gt=0, description="Local learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD heavy-ball momentum.")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty of the local optimiser.")
    batch_size: int = Field(32, ge=1, description="Local mini-batch size.")
    local_steps: int | None = Field(None, ge=1, description="Local optimiser steps per task (overrides local_epochs).")
    local_epochs: float = Field(1.0, gt=0, description="Passes over the client's data per task, when local_steps is unset.")
    vectorize: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Train in-flight tasks of plain local training (FedAvg, FedProx, FedBuff, ...) together, one "
        "batched computation per architecture and options, with the same results: on; off: one by one; auto: "
        "batched when a group has at least vectorize_min_tasks tasks of a model of at most vectorize_max_params "
        "parameters. A model torch.func cannot batch (BatchNorm's running statistics, dropout, in-place updates) "
        "trains one by one under auto (one warning) and is refused by on.",
    )
    vectorize_min_tasks: int = Field(
        VECTORIZE_MIN_TASKS, ge=1, description="auto: the fewest tasks trained together (fewer: one by one)."
    )
    vectorize_max_params: int = Field(
        VECTORIZE_MAX_PARAMS, ge=1, description="auto: the largest model (parameters) trained together."
    )
    device: str = Field(
        "cpu",
        description="Where local training and evaluation compute: cpu, cuda (cuda:0), cuda:N, mps, or auto (the first "
        "CUDA device, else mps, else the CPU). The server's model and the strategies' arithmetic stay on the CPU; each "
        "client's data is moved to the device once. A device this machine lacks is an error at the run's start.",
    )
    state_memory_mb: float | None = Field(
        1024.0,
        ge=0,
        description="Memory budget (MiB) for per-client tensors kept between tasks (Ditto's personal models, SCAFFOLD's "
        "control variates, FedStale's stored updates): the least recently used beyond it are spilled to memory-mapped "
        "temporary files (in TMPDIR), with identical results; null: unlimited, 0: everything spilled.",
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        name = value.strip().lower()
        kind, colon, index = name.partition(":")
        if name not in ("auto", "cpu", "mps") and not (kind == "cuda" and (not colon or index.isdigit())):
            raise ValueError(f"{value!r} is not a device; expected auto, cpu, cuda, cuda:N or mps")
        return name

    @field_validator("vectorize", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads an unquoted ``on``/``off`` as true/false: take them as meant."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# --------------------------------------------------------------------------- strategy and run
class SelectionConfig(Section):
    """Client selection of round-based algorithms (hetfl algorithms lists the selections and their parameters)."""

    name: str = Field(
        "random",
        description="random (uniform), oort or hetero_select; or a Selection subclass of your own, package.module:Class.",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the selection `name`.")

    @field_validator("name", mode="before")
    @classmethod
    def _known_selection(cls, value: Any) -> str:
        return registry.check_name("selection", value)


class AggregatorConfig(Section):
    """How the server combines the clients' model changes (hetfl.strategies.robust): the weighted mean, or a rule
    robust to Byzantine clients. Algorithms that aggregate a mean of changes take it (fedavg, fedprox, fedadam,
    fedyogi, fedbuff); the others refuse a rule other than mean."""

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"] = Field(
        "mean",
        description="mean (the algorithm's own weighted mean), median or trimmed_mean (coordinate-wise; Yin et al., ICML "
        "2018), krum or multi_krum (Blanchard et al., NeurIPS 2017). Robust rules give every update one vote.",
    )
    trim_frac: float = Field(
        0.1, ge=0, lt=0.5, description="trimmed_mean: drop the floor(trim_frac * K) largest and as many smallest values "
        "of each coordinate over the K updates."
    )
    byzantine: int = Field(
        1, ge=0, description="krum, multi_krum: f, the Byzantine updates tolerated; needs more than 2f + 2 updates per "
        "aggregation (multi_krum averages the K - f best)."
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="Norm bounding (Sun et al., arXiv:1911.07963): every client change is scaled down to L2 "
        "norm at most this before the rule combines them; unset: none. With Gaussian noise it is strategy.privacy."
    )


class PrivacyConfig(Section):
    """Client-level differential privacy, DP-FedAvg (McMahan et al., ICLR 2018; hetfl.strategies.robust): each
    client's change clipped to L2 norm clip, Gaussian noise on their sum. Off unless clip is set."""

    clip: float | None = Field(
        None, gt=0, description="C: every client change is scaled down to L2 norm at most C; unset: no differential privacy."
    )
    noise_multiplier: float = Field(
        1.0, ge=0, description="z: the noise added to the sum of a round's clipped changes is N(0, (z C)^2 I); 0: "
        "clipping only (no privacy guarantee: dp_epsilon is null)."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta at which dp_epsilon is reported.")

    @model_validator(mode="after")
    def _clip_needed(self) -> "PrivacyConfig":
        defaults = PrivacyConfig.model_fields
        others = [name for name in ("noise_multiplier", "delta") if getattr(self, name) != defaults[name].default]
        if self.clip is None and others:  # a resolved config.yaml lists the defaults: only a changed value is an error
            raise ValueError(
                f"strategy.privacy.clip: set the clipping norm C to use differential privacy "
                f"({others[0]} alone does nothing)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.clip is not None


class CompressionConfig(Section):
    """Compression of each client's upload, its change w_i - w, in the client half (hetfl.compression): the server
    aggregates what the codec's bytes carry, and the simulator charges those bytes. For algorithms whose upload is
    one change of the global model."""

    kind: Literal["none", "float16", "topk", "qsgd"] = Field(
        "none", description="none (exact), float16 (2 bytes an entry), topk (the ratio of largest entries, 8 bytes "
        "each: an int32 index and a float32 value), qsgd (QSGD's unbiased stochastic quantisation to levels)."
    )
    ratio: float = Field(0.01, gt=0, le=1, description="topk: the share of the change's entries a client sends.")
    levels: int = Field(4, ge=1, description="qsgd: s, the quantisation levels (a sign bit and ceil(log2(s+1)) bits an entry).")
    bucket: int = Field(512, ge=1, description="qsgd: entries per bucket, each with its own float32 norm.")
    error_feedback: bool = Field(
        True, description="Each client keeps what compression dropped and adds it to its next change (Stich et al. 2018)."
    )


class StrategyConfig(Section):
    """Which algorithm runs and its parameters.

    ``params`` is validated by the strategy class itself (its keyword-only constructor), so each
    algorithm documents its own parameters in one place.
    """

    name: str = Field(
        "fedavg",
        description="Algorithm (hetfl algorithms lists them); or a Strategy subclass of your own, package.module:Class.",
    )
    clients_per_round: int = Field(10, ge=1, description="Clients sampled per round (fewer if fewer are online).")
    deadline_s: float | None = Field(None, gt=0, description="Round deadline in simulated seconds; later updates are dropped.")
    partial_work: bool = Field(
        False, description="Round-based algorithms with deadline_s, simulated: a client too slow for all its local steps "
        "trains the steps that arrive by the deadline (FedProx's partial work) instead of being dropped."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the algorithm `name`.")
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="Which clients a round-based algorithm trains each round."
    )
    aggregator: AggregatorConfig = Field(
        default_factory=AggregatorConfig, description="How the server combines client changes: the mean or a robust rule."
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="Client-level differential privacy (DP-FedAvg): off unless clip is set."
    )
    compression: CompressionConfig = Field(
        default_factory=CompressionConfig, description="Compression of each client's upload (its change of the model)."
    )
    per_algorithm: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Parameters by algorithm name, used whenever that algorithm runs (e.g. in hetfl compare): "
        "{fedprox: {mu: 0.1}, fedadam: {server_lr: 0.03}}.",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _known_strategy(cls, value: Any) -> str:
        return registry.check_name("strategy", value)

    @field_validator("per_algorithm", mode="before")
    @classmethod
    def _known_algorithms(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {registry.check_name("strategy", name): params for name, params in value.items()}
        return value

    @model_validator(mode="after")
    def _partial_work_needs_deadline(self) -> "StrategyConfig":
        if self.partial_work and self.deadline_s is None:
            raise ValueError("strategy.partial_work: set strategy.deadline_s, the round deadline partial work must meet")
        return self

    def params_for(self, name: str) -> dict[str, Any]:
        """The parameters algorithm ``name`` runs with: ``per_algorithm[name]``, then ``params`` if it is ``name``."""
        return {**self.per_algorithm.get(name, {}), **(self.params if name == self.name else {})}


class EvaluationConfig(Section):
    every: int = Field(1, ge=1, description="Evaluate the global model every this many aggregations.")
    every_s: float | None = Field(
        None, gt=0,
        description="Instead of `every`: evaluate at the first aggregation of each new window of this many simulated "
        "seconds, so that algorithms aggregating at different rates are measured at the same time resolution (a time "
        "to target is then late by at most every_s plus the gap between two aggregations).",
    )
    target_accuracy: float = Field(
        0.9, gt=0, le=1,
        description="Accuracy whose first crossing gives time_to_target_s (a language model's target is target_perplexity).",
    )
    target_perplexity: float | None = Field(
        None, ge=1,
        description="Language models: perplexity whose first crossing from above gives time_to_target_s; "
        "default 0.95 x the perplexity of the first evaluation (the model the federation starts from).",
    )
    stop_at_target: bool = Field(False, description="End the run once the target (accuracy, or perplexity) is reached.")
    split: Literal["test", "validation"] = Field(
        "test", description="What the global model and per-client metrics are scored on: each client's test split, or "
        "its validation split (data.validation_fraction > 0; hetfl sweep's trials, so tuning never reads the test split).",
    )

    @model_validator(mode="after")
    def _one_schedule(self) -> "EvaluationConfig":
        if self.every_s is not None and self.every != 1:
            raise ValueError("evaluation.every_s replaces evaluation.every: set one of them (leave every at 1)")
        return self

    def due(self, version: int, now: float, last_s: float | None) -> bool:
        """Whether the aggregation that made model ``version`` at simulated time ``now`` is evaluated, the last
        evaluation having been at ``last_s`` (None: none yet)."""
        if self.every_s is None:
            return version % self.every == 0
        return last_s is None or math.floor(now / self.every_s) > math.floor(last_s / self.every_s)


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


class ServerConfig(Section):
    """The server's own cost on the simulated clock (hetfl.engine.server_time); unset: a free server."""

    flops: float | None = Field(
        None, gt=0, description="The server's FLOP/s: aggregation, server-side training and evaluation take this long "
        "and delay the next dispatch. Unset: server work takes no simulated time."
    )
    up_mbps: float | None = Field(
        None, gt=0, description="The server's uplink (what clients download), Mbit/s, shared by `concurrency` downloads. "
        "Unset: unlimited."
    )
    down_mbps: float | None = Field(
        None, gt=0, description="The server's downlink (what clients upload), Mbit/s, each upload capped at its share. "
        "Unset: unlimited."
    )
    concurrency: int | None = Field(
        None, ge=1, description="Downloads the server serves at once, each at up_mbps / concurrency; further ones wait "
        "(first come, first served). Unset: any number, each with the whole link."
    )


class HierarchyConfig(Section):
    """Leaf aggregators between the clients and the server (hetfl.engine.hierarchy; LIFL, arXiv:2405.10968)."""

    fan_in: int | None = Field(
        None, ge=1, description="Updates a leaf aggregates before it forwards their weighted mean to the server (the "
        "root, `server:`); also the tasks in flight per leaf: a leaf is started while fewer than ceil(tasks in flight "
        "/ fan_in) are open. Only for strategies that aggregate by a weighted mean (fedavg, fedprox). Unset: no "
        "leaves, clients upload to the server."
    )
    max_leaves: int | None = Field(None, ge=1, description="Leaves open at once. Unset: as many as the load asks.")
    flops: float | None = Field(
        None, gt=0, description="Each leaf's FLOP/s for its eager aggregation (2 FLOPs a parameter per update). "
        "Unset: it takes no simulated time."
    )
    up_mbps: float | None = Field(
        None, gt=0, description="Each leaf's uplink, Mbit/s: its forwards to the server (also capped at the server's "
        "down_mbps share). Unset: unlimited."
    )
    down_mbps: float | None = Field(
        None, gt=0, description="Each leaf's downlink, Mbit/s: its clients' uploads, each capped at its share "
        "(down_mbps / concurrency). Unset: unlimited."
    )
    concurrency: int | None = Field(None, ge=1, description="Uploads a leaf receives at once (its link's divisor).")
    cold_start_s: float = Field(
        0.0, ge=0, description="Seconds after a leaf starts before it can aggregate (a serverless cold start)."
    )

    @model_validator(mode="after")
    def _needs_fan_in(self) -> "HierarchyConfig":
        if self.fan_in is None:
            for key in ("max_leaves", "flops", "up_mbps", "down_mbps", "concurrency", "cold_start_s"):
                if getattr(self, key):
                    raise ValueError(f"{key} is set without fan_in, which turns leaf aggregators on")
        return self


class AggregationConfig(Section):
    """Where updates are aggregated (simulated; a deployment runs `hetfl aggregator` processes instead)."""

    hierarchy: HierarchyConfig = Field(
        default_factory=HierarchyConfig, description="Leaf aggregators (LIFL): off unless fan_in is set."
    )


class BackendConfig(Section):
    """Where clients' local training runs; the virtual clock and the strategy stay in the hetfl process, so every
    backend gives the same run for the same seed (docs/architecture.md, "Backends")."""

    name: Literal["inprocess", "ray"] = Field(
        "inprocess",
        description="inprocess: in the hetfl process, at each task's arrival (batched per training.vectorize); ray: on "
        "Ray workers, each task from its dispatch on (pip install hetfl[ray]).",
    )
    address: str | None = Field(
        None,
        description="ray: the cluster to use, as ray.init(address=...): auto (a cluster started on this machine with "
        "ray start), ray://HOST:10001 (Ray Client); unset: start a local Ray for the run and stop it at the end.",
    )
    num_workers: int | None = Field(
        None, ge=1, description="ray, local only: tasks trained at once, each with `threads` torch threads; unset: this "
        "machine's cores / threads.",
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="ray: passed to ray.init(runtime_env=...) so a cluster's workers can import hetfl, e.g. {py_modules: "
        "[/path/to/src/hetfl], pip: [torch==2.13.0, pydantic, pyyaml, rich, matplotlib]}; paths are as seen from where "
        "hetfl runs.",
    )

    num_gpus_per_worker: float = Field(
        0.0, ge=0, description="ray: GPUs each task reserves (Ray's num_gpus; fractional shares a GPU, e.g. 0.25: four "
        "tasks a GPU); give training.device auto or cuda so that the workers train on it.",
    )

    @model_validator(mode="after")
    def _usable(self) -> "BackendConfig":
        if self.name == "ray" and not _installed("ray"):
            raise ValueError("backend.name: ray is not installed; pip install hetfl[ray]")
        if self.address is not None and self.num_workers is not None:
            raise ValueError("backend.num_workers: only for a local Ray; a cluster at backend.address has its own workers")
        if self.num_gpus_per_worker and self.name != "ray":
            raise ValueError("backend.num_gpus_per_worker: only for backend.name: ray; in process, training.device "
                             "says where training runs")
        return self


class UpdateNormConfig(Section):
    """How a deployed server bounds the L2 norm of each update's change (docs/deployment.md): a defence against a
    client that sends a huge but finite update. adaptive: after ``warmup`` accepted updates, an update whose change has
    a norm over ``factor`` times the median of the last ``window`` accepted ones is rejected (norms are divided by the
    square root of the task's local steps first, so a client given more steps is not taken for an attacker)."""

    rule: Literal["adaptive", "fixed", "off"] = Field(
        "adaptive", description="adaptive (relative to recent accepted updates), fixed (deploy.max_update_norm), off. "
        "Under secure aggregation adaptive means off (the server cannot see an update); fixed is refused there."
    )
    factor: float = Field(10.0, gt=1, description="adaptive: how many times the median recent norm an update may reach.")
    window: int = Field(50, ge=1, description="adaptive: accepted updates whose norms make the median.")
    warmup: int = Field(3, ge=1, description="adaptive: accepted updates before the bound applies.")


class DeployConfig(Section):
    """A real deployment (``hetfl server`` / ``hetfl client`` over gRPC, docs/deployment.md); ignored by the simulator."""

    min_clients: int | None = Field(
        None, ge=1, description="Connected clients the server waits for before the strategy starts; unset: all data.n_clients."
    )
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="A client silent this long (no heartbeat, poll or upload) is disconnected and its task failed."
    )
    task_timeout_s: float | str | None = Field(
        "auto", description="Fail a task not returned this many seconds after dispatch, even if its client is alive, and "
        "keep its client out of the next dispatches for as long; auto: task_timeout_factor times the client's measured "
        "seconds for such a task (its recent round trips), at least task_timeout_floor_s, doubled after each timeout in a "
        "row; off (or null): no limit."
    )
    task_timeout_factor: float = Field(
        4.0, ge=1, description="task_timeout_s auto: the limit as a multiple of the task's expected seconds."
    )
    task_timeout_floor_s: float = Field(
        60.0, gt=0, description="task_timeout_s auto: the least limit, and the limit of a client's tasks before any "
        "client has returned one (nothing measured yet)."
    )
    max_samples: int | None = Field(
        None, ge=1, description="Bound on the sample count a client claims (its weight in aggregations); a count "
        "registered with its token ('samples' in the token file) bounds it too; unset: only the registered count."
    )
    poll_s: float = Field(
        10.0, gt=0, description="How long a client's request for work waits at the server before it asks again (long poll)."
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="Reject an update whose L2 distance from the model it started from exceeds this (a fixed "
        "bound: update_norm.rule fixed); unset: update_norm's rule."
    )
    update_norm: UpdateNormConfig = Field(
        default_factory=lambda: UpdateNormConfig(), description="The bound on the norm of each update's change: "
        "adaptive by default (off under secure_aggregation, which hides updates)."
    )
    compression: Literal["none", "float16", "topk"] = Field(
        "none", description="How clients encode their uploads: none (exact), float16 (half the bytes), topk (the delta's "
        "largest entries, 8 bytes each)."
    )
    topk_ratio: float = Field(0.01, gt=0, le=1, description="topk: the share of the delta's entries a client sends.")
    secure_aggregation: bool = Field(
        False, description="Pairwise-masked secure aggregation: the server sees only the cohort's sum (FedAvg and FedProx)."
    )
    secagg_clip: float = Field(
        1000.0, gt=0, description="Secure aggregation: each entry of n_k * (client model - start) is clipped to +-this."
    )
    secagg_scale: float = Field(1000.0, gt=0, description="Secure aggregation: the fixed-point factor (resolution 1/scale).")
    tokens: str | None = Field(
        None, description="Token file (YAML or CSV: token -> client id, and revoked tokens); --tokens overrides it."
    )
    chunk_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="Bytes per chunk of a streamed model or update.")

    call_timeout_s: float = Field(
        60.0, gt=0, description="Every call's deadline at the server: this, plus poll_s for a long poll, plus the bytes "
        "it moves at min_transfer_Bps; a call past it is cancelled."
    )
    min_transfer_Bps: float = Field(
        10_000.0, gt=0, description="The slowest transfer the server waits for, in bytes per second (it sets the "
        "deadline of a download or an upload with call_timeout_s)."
    )
    max_calls_per_peer: int = Field(
        64, ge=1, description="Calls the server has open at once from one network address (clients behind one NAT "
        "share it; an honest client uses at most three)."
    )
    max_failed_joins: int = Field(
        20, ge=1, description="Joins with an unknown or revoked token one network address may make in a minute; "
        "beyond, its joins are refused until the minute is over."
    )

    @field_validator("task_timeout_s", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        if value is None or value in ("auto", "off"):
            return "off" if value is None else value
        try:
            seconds = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            seconds = math.nan
        if not seconds > 0 or not math.isfinite(seconds):
            raise ValueError(f"deploy.task_timeout_s: {value!r} is not a positive number of seconds, auto or off")
        return seconds

    @model_validator(mode="after")
    def _norm_rule(self) -> "DeployConfig":
        rule = self.update_norm.rule
        if self.max_update_norm is not None:
            if rule == "off" or (rule == "adaptive" and "rule" in self.update_norm.model_fields_set):
                raise ValueError(f"deploy.max_update_norm is a fixed bound; deploy.update_norm.rule {rule} says otherwise "
                                 "(set rule: fixed, or leave max_update_norm unset)")
            if rule != "fixed":
                self.update_norm.rule = "fixed"
        elif rule == "fixed":
            raise ValueError("deploy.update_norm.rule: fixed needs deploy.max_update_norm, the bound")
        return self


FlowerScalar = bool | int | float | str


class FlowerConfig(Section):
    """A Flower client_fn's run (``client``, hetfl.flower): what its Context and its fit and evaluate configs carry."""

    run_config: dict[str, FlowerScalar] = Field(
        default_factory=dict, description="client: Context.run_config of every client (Flower's run config, e.g. the "
        "[tool.flwr.app.config] of the app's pyproject.toml)."
    )
    node_config: dict[str, FlowerScalar] = Field(
        default_factory=dict, description="client: more Context.node_config entries for every client, besides "
        "partition-id (the client's index) and num-partitions (data.n_clients)."
    )
    fit_config: dict[str, FlowerScalar] = Field(
        default_factory=dict, description="client: added to the config of every fit; hetfl's own keys win over these "
        "(server_round, local_steps, local_epochs, batch_size, lr, seed, and the task's options, e.g. proximal_mu)."
    )
    evaluate_config: dict[str, FlowerScalar] = Field(
        default_factory=dict, description="client: the config of every evaluate, besides server_round."
    )
    flops_per_step: float | None = Field(
        None, gt=0, description="client: FLOPs of one local step of every client, instead of measuring each client's fit "
        "with torch's FlopCounterMode (needed when the fit runs no torch, e.g. NumPy or TensorFlow)."
    )


class CallbackConfig(Section):
    """A tracker of one's own (hetfl.results.tracking): an import path and the parameters it is built with."""

    name: str = Field(description="A tracker class or factory, package.module:Class (or a built-in: csv, tensorboard, mlflow).")
    params: dict[str, Any] = Field(default_factory=dict, description="Its keyword arguments.")

    @field_validator("name", mode="before")
    @classmethod
    def _known_tracker(cls, value: Any) -> str:
        return registry.check_name("tracker", value)


TRACKER_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}  # key: (module, extra)


class TrackingConfig(Section):
    """Experiment trackers (hetfl.results.tracking, docs/metrics.md): every evaluation also goes to these as it is
    written to metrics.jsonl, and each run's summary at its end."""

    tensorboard: str | None = Field(
        None, description="A folder for TensorBoard event files, one subfolder per run (named as the run's folder); "
        "pip install hetfl[tensorboard].",
    )
    mlflow: str | None = Field(
        None, description="An MLflow tracking URI (http://..., sqlite:///...) or a path: a .db file or a folder holding "
        "mlflow.db (a local SQLite store); one MLflow run per hetfl run, in the experiment of the config's name; pip "
        "install hetfl[mlflow].",
    )
    csv: str | None = Field(None, description="A CSV file: one row per evaluation, a first column run naming the run's folder.")
    callbacks: list[CallbackConfig] = Field(
        default_factory=list, description="Trackers of your own: import paths (package.module:Class) or {name, params}; "
        "called with on_start, on_metrics, on_end (docs/extending.md).",
    )

    @field_validator("callbacks", mode="before")
    @classmethod
    def _callback_names(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [item if isinstance(item, (dict, CallbackConfig)) else {"name": item} for item in value]
        return value

    @model_validator(mode="after")
    def _installed_packages(self) -> "TrackingConfig":
        for key, (module, extra) in TRACKER_EXTRAS.items():
            if getattr(self, key) is not None and not _installed(module):
                raise ValueError(f"tracking.{key}: the {module} package is not installed; pip install hetfl[{extra}]")
        return self

    def entries(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every tracker as (config key, name, parameters): the three writers' keys first, then ``callbacks``."""
        writers = [("tracking.csv", "csv", {"path": self.csv}),
                   ("tracking.tensorboard", "tensorboard", {"log_dir": self.tensorboard}),
                   ("tracking.mlflow", "mlflow", {"uri": self.mlflow})]
        found = [(key, name, params) for key, name, params in writers if next(iter(params.values())) is not None]
        return found + [(f"tracking.callbacks.{i}.name", c.name, c.params) for i, c in enumerate(self.callbacks)]


class CodeRecord(Section):
    """Where a piece of user code came from (hetfl.registry.Resolved.record)."""

    path: str = Field(description="Its import path, module:attribute.")
    origin: str = Field("import path", description="import path, or the entry point and distribution that named it.")
    file: str | None = Field(None, description="The source file that defines it.")
    sha256: str | None = Field(None, description="SHA-256 of that file.")
    root: str | None = Field(None, description="The directory its top-level module was imported from.")


def check_seeds(values: Any) -> list[int]:
    """``values`` as a list of distinct non-negative integer seeds, or a ValueError saying what is wrong with it
    (the caller names the key: ``seeds`` in a config, ``--seeds`` on the command line)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"expected a list of integer seeds, e.g. [0, 1, 2], not {values!r}")
    if not values:
        raise ValueError("an empty list; give at least one seed, e.g. [0, 1, 2]")
    seen: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        if value < 0:
            raise ValueError(f"{value} is negative; seeds are integers from 0")
        if value in seen:
            raise ValueError(f"{value} is given twice; each seed once")
        seen.append(value)
    return seen


def code_keys(cfg: "ExperimentConfig") -> list[tuple[str, str, str]]:
    """Every (key, kind, name) of ``cfg`` that names code (:mod:`hetfl.registry`)."""
    keys = [("model.name", "model", cfg.model.name)]
    keys += [(f"model.zoo.{i}.name", "model", arch.name) for i, arch in enumerate(cfg.model.zoo)]
    keys += [("data.dataset", "dataset", cfg.data.dataset), ("data.partition.kind", "partition", cfg.data.partition.kind)]
    keys += [("strategy.name", "strategy", cfg.strategy.name)]
    keys += [(f"strategy.per_algorithm.{name}", "strategy", name) for name in cfg.strategy.per_algorithm]
    keys += [("strategy.selection.name", "selection", cfg.strategy.selection.name)]
    if cfg.client is not None:
        keys.append(("client", "client", cfg.client))
    keys += [(f"tracking.callbacks.{i}.name", "tracker", c.name) for i, c in enumerate(cfg.tracking.callbacks)]
    return keys


class ExperimentConfig(Section):
    name: str = Field("experiment", description="A label for the run (shown in tables and the run index).")
    seed: int = Field(0, description="Seeds data partition, devices, model initialisation, sampling and batches.")
    seeds: list[int] | None = Field(
        None,
        description="hetfl compare: run every algorithm once per seed in this list (e.g. [0, 1, 2]; distinct "
        "non-negative integers) and report mean, standard deviation and 95% confidence interval over them "
        "(docs/metrics.md); --seeds overrides it. Unset: the one run of seed. hetfl run uses seed only.",
    )
    rounds: int = Field(50, ge=1, description="Number of aggregations (server model versions) to run.")
    max_sim_time_s: float | None = Field(
        None, gt=0, description="Stop once simulated time passes this; the progress bar then shows simulated time "
        "against it (with rounds set high, a run bounded by time).",
    )
    checkpoint_every: int = Field(10, ge=1, description="Checkpoint the server state every this many aggregations.")
    threads: int = Field(1, ge=1, description="torch intra-op threads (small models run fastest on one).")
    data: DataConfig = DataConfig()
    devices: DevicesConfig = DevicesConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    strategy: StrategyConfig = StrategyConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    backend: BackendConfig = BackendConfig()
    server: ServerConfig = Field(
        ServerConfig(), description="The simulated server's compute and links (a deployed server's cost is real)."
    )
    aggregation: AggregationConfig = Field(
        AggregationConfig(), description="Hierarchical aggregation: leaf aggregators between clients and the server."
    )
    deploy: DeployConfig = DeployConfig()
    client: str | None = Field(
        None,
        description="A Flower client_fn of your own (package.module:client_fn; context -> Client or NumPyClient) whose "
        "fit and evaluate are the clients' training and evaluation, under hetfl's clock and strategies (hetfl.flower; "
        "pip install hetfl[flower]); unset: hetfl trains model.name on data.dataset.",
    )
    flower: FlowerConfig = Field(
        default_factory=FlowerConfig, description="With client: the Flower client's Context and configs (hetfl.flower)."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment trackers: TensorBoard, MLflow, CSV, your own callbacks."
    )
    code: dict[str, CodeRecord] = Field(
        default_factory=dict,
        description="Written by hetfl: for each key that names code not built into hetfl (a model, dataset, partition, "
        "strategy, selection or client of your own), its import path, origin, source file and SHA-256. When a config "
        "carries it (a run's config.yaml, the one a server sends its clients), the code must still hash the same: a "
        "resumed run or a deployed client refuses changed code; delete the entry to accept the change.",
    )

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        return None if value is None else check_seeds(value)

    @field_validator("client", mode="before")
    @classmethod
    def _client_path(cls, value: Any) -> Any:
        return None if value is None else registry.check_name("client", value)

    @model_validator(mode="after")
    def _flower_client(self) -> "ExperimentConfig":
        """What a Flower client (``client``) cannot do; the ``flower`` section only with one (hetfl.flower)."""
        if self.client is None:
            changed = [k for k, v in self.flower.model_dump().items() if v != FlowerConfig.model_fields[k].get_default(
                call_default_factory=True)]
            if changed:
                raise ValueError(f"flower.{changed[0]}: used only with client (a Flower client_fn)")
            return self
        refusals = [
            (self.backend.name == "ray", "backend.name: ray workers rebuild hetfl's own trainer; a Flower client "
             "runs in the hetfl process (backend.name: inprocess)"),
            (self.training.vectorize == "on", "training.vectorize: on batches hetfl's own trainer; a Flower client "
             "trains in its fit, one task at a time (auto or off)"),
            (bool(self.model.zoo), "model.zoo: a Flower client brings its own model; drop model.zoo"),
            (self.data.drift.kind != "none", "data.drift.kind: drift relabels hetfl's own data; a Flower client's "
             "data is its own"),
            (self.data.feature_skew.kind != "none", "data.feature_skew.kind: it transforms hetfl's own data; a Flower "
             "client's data is its own"),
        ]
        for refused, message in refusals:
            if refused:
                raise ValueError(message)
        return self

    @model_validator(mode="after")
    def _validation_split(self) -> "ExperimentConfig":
        if self.evaluation.split == "validation" and not self.data.validation_fraction:
            raise ValueError("evaluation.split: validation needs a validation split; set data.validation_fraction, "
                             "e.g. 0.2")
        if self.data.validation_fraction and self.client is not None:
            raise ValueError("data.validation_fraction: a Flower client's data is its own; set 0")
        if self.data.labelled_fraction != 1.0 and self.client is not None:
            raise ValueError("data.labelled_fraction: a Flower client's data is its own; set 1")
        return self

    @model_validator(mode="after")
    def _model_fits_data(self) -> "ExperimentConfig":
        own = [not registry.is_builtin("model", a.name) for a in [self.model, *self.model.zoo]]
        lm = [a.name == "tinylm" for a in [self.model, *self.model.zoo]]
        if self.data.dataset == "text" and not all(a or b for a, b in zip(lm, own)):
            raise ValueError("model.name: the text dataset is next-token prediction; use tinylm (and tinylm in model.zoo)")
        if self.data.dataset != "text" and any(lm) and registry.is_builtin("dataset", self.data.dataset):
            raise ValueError(f"model.name: tinylm is a language model for data.dataset text, not {self.data.dataset}")
        return self

    @model_validator(mode="after")
    def _resolve_code(self, info: ValidationInfo) -> "ExperimentConfig":
        """Import every piece of user code the config names (a one-line error naming the key if one cannot be), record
        where it came from in ``code``, and refuse code that no longer hashes as an incoming ``code`` entry says."""
        base = (info.context or {}).get("base_dir") if info is not None else None
        pins = self.code
        records: dict[str, CodeRecord] = {}
        for key, kind, spec in code_keys(self):
            if registry.is_builtin(kind, spec):
                continue
            pin = pins.get(key)
            search = [base, os.getcwd(), pin.root if pin is not None else None]
            try:
                resolved = registry.resolve(kind, spec, key=key, search=search)
            except ConfigError as err:
                raise ValueError(str(err)) from None
            if pin is not None and pin.path == resolved.path and pin.sha256 and resolved.sha256 != pin.sha256:
                raise ValueError(
                    f"{key}: {spec} has changed since this config was written: {resolved.file} has SHA-256 "
                    f"{(resolved.sha256 or 'none')[:12]}, the config records {pin.sha256[:12]} ({pin.file}); restore that "
                    f"code, or delete code.{key} from the config to run the new code"
                )
            records[key] = CodeRecord(**resolved.record())
        if records != pins:
            self.__dict__["code"] = records  # not an assignment: that would validate the whole config again
            if records:
                self.model_fields_set.add("code")
            else:
                self.model_fields_set.discard("code")
        return self


# --------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); here it is a float, as people expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _error_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
        if re.match(r"^[\w\[\]-]+(\.[\w\[\]-]+)+: ", msg) or re.match(r"^client: ", msg):  # the validator named the key
            return f"{source}: {msg}" + (f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else "")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def parse_value(text: str) -> Any:
    """Parse the value of a ``--set key=value`` override as YAML (so ``0.1``, ``true``, ``[1,2]`` work)."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config mapping (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set strategy.name=fedprox")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: the key before '=' is empty")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return raw


def validate(raw: dict[str, Any], source: str = "config", base_dir: str | Path | None = None) -> ExperimentConfig:
    """``raw`` as an :class:`ExperimentConfig`; ``base_dir``: where import paths are looked for first (the config
    file's directory; then the current directory and ``sys.path``, :mod:`hetfl.registry`)."""
    try:
        return ExperimentConfig.model_validate(raw, context={"base_dir": str(base_dir) if base_dir is not None else None})
    except ValidationError as err:
        raise ConfigError(_error_line(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config file, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    _resolve_paths(raw, path.parent)
    return validate(apply_overrides(raw, overrides or []), source=str(path), base_dir=path.parent.resolve())


PATH_KEYS = (("data", "path"), ("data", "partition", "embeddings"), ("devices", "trace"), ("deploy", "tokens"),
             ("tracking", "tensorboard"), ("tracking", "csv"), ("tracking", "mlflow"))


def is_uri(text: str) -> bool:
    """Whether ``text`` is a URI (``http://...``, ``sqlite:///...``, ``file:...``, ``databricks``), not a path."""
    return "://" in text or text.startswith(("file:", "databricks"))


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative file paths in a config file are relative to that file (so examples run from anywhere)."""
    for *sections, key in PATH_KEYS:
        node: Any = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str) and not Path(node[key]).is_absolute() \
                and not is_uri(node[key]):
            node[key] = str((base / node[key]).resolve())


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- reference
def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None").replace(" | ", " or ")


def reference(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every config key as (key, type, default, description), walked from the pydantic models."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += reference(annotation, f"{key}.")
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, _type_name(annotation), yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip(),
                     field.description or ""))
    return rows


DATA_FORMATS = """
## Data formats

What `data.path` holds for the datasets read from disk. Nothing is downloaded, and a file that does not hold
what is expected (empty, truncated or corrupt, strings where numbers belong, NaN or infinite values, a missing
label) is a one-line error naming it.

### `.npz` (`data.dataset: npz`)

A `numpy.savez` or `numpy.savez_compressed` archive of numeric arrays; nothing in it is unpickled.

| array | shape | meaning |
|---|---|---|
| `x` | `(N, ...)` | the features of N samples, all of one shape: `(F,)` for tabular data, `(C, H, W)` for images; numbers (bool, integer or float), no NaN or infinity; read as float32 |
| `y` | `(N,)` | class labels, none missing: non-negative integers are kept (classes `0..max(y)`), anything else (strings, negative or fractional numbers) is mapped to `0..K-1` in sorted order |
| `groups` | `(N,)`, optional | each sample's natural client (a user, a hospital), for `data.partition.kind: natural` |
| `vocab_size` | scalar, optional | marks `x` as integer token ids in `[0, vocab_size)`, which the model embeds |

```python
np.savez("mydata.npz", x=features.astype("float32"), y=labels, groups=site_ids)
```

A deployed client's `--data` file (docs/deployment.md) is the same format with `x` and `y` only: `x` preprocessed as
the server's data is, `y` the server's class ids as they are (non-negative integers). `hetfl partition CONFIG
--export DIR` writes them.

### CSV (`data.dataset: csv`)

| part | what it must be |
|---|---|
| header | the first row: a name for every column, each name once (a UTF-8 byte-order mark is ignored) |
| label column | `data.label_column` (default `label`): a value in every row, mapped to `0..K-1` in sorted order (numerically when every value is a number) |
| id column | optional, `data.id_column`: each row's natural client, for `data.partition.kind: natural` |
| features | every other column: a finite number in every row (no empty cell, `nan` or `inf`) |

```text
site,age,dose,label
a,61,0.5,responder
b,47,1.0,non-responder
```

is read with `data: {dataset: csv, path: trial.csv, id_column: site}`: two features (age, dose), two classes.

### Hugging Face `datasets` saved to disk (`data.dataset: hf`)

`data.path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`, read with
`datasets.load_from_disk` (`pip install hetfl[hf]`). `data.columns: {x: COLUMN, y: COLUMN}` picks the feature and
label columns (default: the first two). Of a DatasetDict, `train` is partitioned and `test`, if present, is an
official test set (below); other splits are not used. An image column becomes float32 `(C, H, W)` in [0, 1] (every
image of one size); a `ClassLabel` column gives the number of classes; string labels are mapped to `0..K-1`.

### A loader of your own (`data.dataset: package.module:function`)

Called with `data.params` and whichever of `path`, `seed`, `n_clients`, `config` its signature names, it returns
`(x, y)` (numpy arrays or torch tensors), `{"x": x, "y": y}` with optional `groups`, `n_classes`, `vocab_size`,
`{"train": (x, y), "test": (x, y)}` (an official test set), a `torch.utils.data.Dataset` of `(x, y)` items, a list
of per-client datasets (with `data.partition.kind: natural`), or a `hetfl.data.datasets.Dataset`; the module
docstring of `hetfl.data.datasets` is the full contract. What it returns is checked as files are.

**An official test set** is not split by `data.test_fraction`: the train part is partitioned and each client trains
on all of its share; the test samples are dealt out class by class, each class's in proportion to the clients'
training samples of that class (largest remainders, ties at random; a class no client trains on, in proportion to
training sizes), so a client's test label mix follows its training label mix and every test sample is used once.
With `data.partition.kind: natural` and groups on the test part, a test sample of a group a client trains on goes to
that client.
"""
"""The formats of data files, after the key table of :func:`reference_markdown`."""


def reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Every key of an experiment file, generated from `hetfl.config` (`hetfl config --markdown`).",
        "Unknown keys are errors. Relative paths are relative to the config file. Any key can be set",
        "from the command line: `--set data.partition.alpha=0.1`. The formats of data files follow the",
        "table ([Data formats](#data-formats)).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, kind, default, text in reference():
        lines.append(f"| `{key}` | `{kind}` | `{default}` | {text} |")
    return "\n".join(lines) + "\n" + DATA_FORMATS
