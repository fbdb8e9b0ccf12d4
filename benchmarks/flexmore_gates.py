"""Where FlexMoRE's joined router sends each domain's tokens, from finished runs (``hetfl run ... --out DIR``).

    PYTHONPATH=src .venv/bin/python benchmarks/flexmore_gates.py DIR [DIR ...]

For each run directory (its ``config.yaml`` and ``checkpoint.pt``, a ``flexmore`` run) and each domain, over its
clients' test splits: the router's mean weights (the base, then expert 1, 2, ..., averaged over adapted layers
and tokens), the perplexity of the joined mixture, and the perplexity of the domain's own expert alone behind
the gate it was trained with (``sigmoid(x . r_d)``): what a router that knew each token's domain would give.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import yaml

from hetfl.config import validate
from hetfl.engine.run import build_federation
from hetfl.strategies.flexmore import mixture_hooks


def domain_report(fed, strategy, params: torch.Tensor) -> list[str]:
    trainer = fed.trainer
    layers = strategy.layers(trainer)
    experts, routers = strategy.experts(layers, params), strategy.routers(layers, params)
    ds = fed.data.dataset
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y)
    split = fed.data.evaluation_split(fed.config.evaluation.split)
    rows = []
    for d in range(strategy.domains):
        idx = torch.cat([torch.as_tensor(split[c]) for c in range(len(split)) if strategy.domain(c) == d])
        xs, ys = x[idx], y[idx]
        weights: list[torch.Tensor] = []
        gate_hooks = [(layer.module, lambda m, inputs, out, i=i: weights.append(torch.softmax(torch.stack(
            [torch.zeros(inputs[0].shape[:-1])] + [inputs[0] @ r[i] for r in routers], -1), -1).reshape(
            -1, len(routers) + 1).mean(0)) or out) for i, layer in enumerate(layers)]

        def nll(hooks) -> float:
            handles = [module.register_forward_hook(hook) for module, hook in hooks]
            try:
                with torch.no_grad():
                    logits = trainer.predict(trainer.initial, xs)
            finally:
                for handle in handles:
                    handle.remove()
            return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1)))

        mixed = nll(mixture_hooks(layers, experts, routers) + gate_hooks)
        own = nll(mixture_hooks(layers, [experts[d]], [routers[d]]))
        w = torch.stack(weights).mean(0).tolist()
        rows.append(f"domain {d}: weights {' / '.join(f'{v:.2f}' for v in w)}; mixture perplexity {math.exp(mixed):.3f}, "
                    f"own expert alone {math.exp(own):.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        cfg = validate(yaml.safe_load((run / "config.yaml").read_text()))
        fed = build_federation(cfg)
        state = torch.load(run / "checkpoint.pt", weights_only=False)["state"]
        print(run, *domain_report(fed, state.strategy, state.params), sep="\n  ")


if __name__ == "__main__":
    main()
