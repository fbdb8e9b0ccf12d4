"""What a strategy's class attributes claim, checked on a run: hetfl's tests use it, and so may :mod:`hetfl.testing`.

``linear_aggregation``: the strategy's aggregation depends on a round's updates only through their
sample-weighted mean, so a deployment may aggregate them securely (:mod:`hetfl.deploy.secure`): the
server then learns only the mean, and hands the strategy, for every survivor of a cohort, an update whose
model is ``w + sum_k n_k (w_k - w) / sum_k n_k`` (:func:`secure_updates`). :func:`check_linear_aggregation`
runs a federation twice, with the updates as they are and with what secure aggregation would hand over,
and requires the same global model after every aggregation.

One aggregation is not enough to tell: FedStale's step uses the round's fresh changes only through their
mean, but it also stores each participant's own change for later rounds, and under secure aggregation every
stored change would be the mean; the rounds after the first show it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from hetfl.strategies.base import Strategy, Update


def secure_updates(updates: list[Update]) -> list[Update]:
    """What secure aggregation hands the strategy in place of ``updates``.

    A cohort is the updates of tasks started from one model version ``w`` (:mod:`hetfl.deploy.secure`); each
    survivor's update keeps its sample count, steps, loss and stats, and its model becomes the cohort's
    ``w + sum_k n_k (w_k - w) / sum_k n_k`` (the mean taken in float64, then cast to the model's dtype as the
    server does); no payload travels.
    """
    out = list(updates)
    for version in sorted({u.task.version for u in updates}):
        cohort = [i for i, u in enumerate(updates) if u.task.version == version]
        n = torch.tensor([float(updates[i].n_samples) for i in cohort], dtype=torch.float64)
        deltas = torch.stack([updates[i].delta.double() for i in cohort])
        mean_delta = (n @ deltas) / n.sum()
        for i in cohort:
            u = updates[i]
            out[i] = dataclasses.replace(u, params=u.task.params + mean_delta.to(u.params.dtype), payload={})
    return out


def shared_mean(group: list[Update]) -> list[Update]:
    """What a strategy is handed for ``group`` when only the group's mean travels (a leaf's forward in the simulator,
    :mod:`hetfl.engine.hierarchy`; a ``hetfl aggregator``'s aggregate, :mod:`hetfl.deploy.engine`), in task order:
    :func:`secure_updates` (the members' sample-weighted mean per model version, each member's own samples, steps,
    loss and stats), the members of one version sharing one params tensor, so that the commit counts the group as one
    merge."""
    out = secure_updates(sorted(group, key=lambda u: u.task.task_id))
    shared: dict[int, torch.Tensor] = {}
    return [dataclasses.replace(u, params=shared.setdefault(u.task.version, u.params)) for u in out]


def check_linear_aggregation(
    make: Callable[[], Strategy],
    run: Callable[[Strategy], Any],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    min_aggregations: int = 2,
) -> int:
    """Check that the strategy ``make()`` builds aggregates the same when it is handed only the weighted mean.

    ``run(strategy)`` runs one federation with ``strategy`` (the same data, devices and seed on every call).
    It is called twice, with a fresh strategy each time: once as it is, once with every aggregation's updates
    replaced by :func:`secure_updates`. The two runs must give the same global model after every aggregation
    (within ``rtol`` and ``atol``). Only strategies that aggregate in ``aggregate(server, updates)`` (the
    round-based ones, :class:`~hetfl.strategies.rounds.RoundStrategy`) can be checked: secure aggregation's
    cohorts are a round's tasks.

    Returns the number of aggregations compared. Raises ``AssertionError`` naming the first aggregation whose
    model differs, or when fewer than ``min_aggregations`` of them combined two or more different updates
    (replacing one update by the mean of one changes nothing, so the check would prove nothing); ``TypeError``
    for a strategy without ``aggregate``.
    """

    def one_run(secure: bool) -> tuple[Strategy, list[torch.Tensor], int]:
        strategy = make()
        aggregate = getattr(strategy, "aggregate", None)
        if aggregate is None:
            raise TypeError(
                f"{strategy.name}: only strategies that aggregate in aggregate(server, updates) (round-based ones) "
                "can be checked for linear aggregation"
            )
        models: list[torch.Tensor] = []
        mixed = 0  # aggregations of two or more different updates

        def recorded(server: Any, updates: list[Update]) -> torch.Tensor:
            nonlocal mixed
            mixed += len(updates) > 1 and any(not torch.equal(u.params, updates[0].params) for u in updates)
            params = aggregate(server, secure_updates(updates) if secure else updates)
            models.append(params.detach().clone())
            return params

        strategy.aggregate = recorded  # type: ignore[method-assign]
        try:
            run(strategy)
        finally:
            del strategy.aggregate  # the class's method again
        return strategy, models, mixed

    strategy, plain, mixed = one_run(secure=False)
    _, secure, _ = one_run(secure=True)
    name = strategy.name
    if mixed < min_aggregations:
        raise AssertionError(
            f"{name}: the run made {mixed} aggregation(s) of two or more different updates, fewer than "
            f"{min_aggregations}: too few to check linear aggregation (run more rounds, or more clients a round)"
        )
    for k, (a, b) in enumerate(zip(plain, secure), start=1):
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            raise AssertionError(
                f"{name}: aggregation {k} of {len(plain)} gives a different model when each update is replaced by "
                f"the updates' sample-weighted mean, as secure aggregation hands them (largest difference "
                f"{float((a - b).abs().max()):.3g}); a strategy that claims linear_aggregation must not depend on "
                "the individual updates"
            )
    if len(plain) != len(secure):
        raise AssertionError(
            f"{name}: {len(plain)} aggregations with the updates as they are, {len(secure)} with their mean"
        )
    return len(plain)
