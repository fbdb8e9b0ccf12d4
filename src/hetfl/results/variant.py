"""A run's variant in a few characters, from its ``config.yaml``: what its strategy section changes from the defaults.

``fedavg`` (nothing changed), ``fedavg+oort`` (a client selection), ``fedprox(mu=0.1)`` (the algorithm's
parameters), ``fedavg[median]`` (a robust aggregator; ``fedavg[mean(max_update_norm=1)]``: norm bounding), ``fedavg+dp(clip=1)`` (differential privacy),
``fedavg+topk(ratio=0.1)`` (update compression, ``strategy.compression``, with the keys its codec reads that
differ from the defaults), ``fedprox(mu=1)+partial`` (stragglers' partial work, ``strategy.partial_work``), in that
order:
``fedprox(mu=0.1)+oort[trimmed_mean(trim_frac=0.2)]+dp(clip=1,noise_multiplier=0.5)+partial``. Compared against the
defaults of :class:`hetfl.config.StrategyConfig`; ``clients_per_round``, ``deadline_s`` and ``per_algorithm`` for
other algorithms are left out (how a run is sized, not which algorithm it is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hetfl.results.metrics import CONFIG_NAME


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _args(values: dict[str, Any]) -> str:
    return f"({','.join(f'{k}={_value(v)}' for k, v in sorted(values.items()))})" if values else ""


def _changed(section: Any, defaults: dict[str, Any], *skip: str) -> dict[str, Any]:
    """The keys of ``section`` (a mapping from config.yaml) whose values differ from ``defaults``."""
    if not isinstance(section, dict):
        return {}
    return {k: v for k, v in section.items() if k not in skip and k in defaults and v != defaults[k]}


def variant_label(strategy: dict[str, Any] | None) -> str | None:
    """The short label of a config's ``strategy`` section (see the module docstring); None without a name."""
    from hetfl.config import StrategyConfig

    if not isinstance(strategy, dict) or not strategy.get("name"):
        return None
    defaults = StrategyConfig().model_dump()
    name = str(strategy["name"])
    per_algorithm = strategy.get("per_algorithm")
    params = {**(per_algorithm.get(name) or {} if isinstance(per_algorithm, dict) else {}),
              **(strategy.get("params") or {})}
    label = name + _args(params)
    selection = strategy.get("selection")
    random = defaults["selection"]["name"]
    if isinstance(selection, dict) and selection.get("name", random) != random:
        label += f"+{selection['name']}{_args(selection.get('params') or {})}"
    aggregator = strategy.get("aggregator")
    if isinstance(aggregator, dict) and (aggregator.get("rule", "mean") != defaults["aggregator"]["rule"]
                                         or aggregator.get("max_update_norm") is not None):
        label += f"[{aggregator['rule']}{_args(_changed(aggregator, defaults['aggregator'], 'rule'))}]"
    privacy = strategy.get("privacy")
    if isinstance(privacy, dict) and privacy.get("clip") is not None:
        label += f"+dp{_args(_changed(privacy, defaults['privacy']))}"
    compression = strategy.get("compression")
    if isinstance(compression, dict) and compression.get("kind", "none") != "none":
        kind = compression["kind"]
        changed = _changed(compression, defaults["compression"], "kind")
        label += f"+{kind}{_args({k: v for k, v in changed.items() if k in CODEC_KEYS.get(kind, ())})}"
    if strategy.get("partial_work"):
        label += "+partial"
    return label


CODEC_KEYS = {"float16": ("error_feedback",), "topk": ("ratio", "error_feedback"),
              "qsgd": ("levels", "bucket", "error_feedback")}
"""The ``strategy.compression`` keys each codec reads: the only ones its label shows."""


def run_variant(run_dir: Path) -> str | None:
    """:func:`variant_label` of the run in ``run_dir``; None when its config.yaml is missing or unreadable."""
    try:
        config = yaml.safe_load((Path(run_dir) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return variant_label(config.get("strategy")) if isinstance(config, dict) else None
