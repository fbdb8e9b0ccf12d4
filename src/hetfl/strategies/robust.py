"""How the server combines client changes: the weighted mean, robust rules, and DP-FedAvg.

One place for every algorithm that aggregates a mean of model changes (FedAvg, FedProx, FedAdam, FedYogi
through :meth:`RoundStrategy.combined_delta`, FedBuff's buffer), in the simulator and in a deployment alike.

Rules (:func:`combine`, over the K x d matrix of changes Delta_1..Delta_K and the algorithm's weights p):

- ``mean``: sum_i p_i Delta_i, the algorithm's own weighted mean (what it does without this module).
- ``median``: the coordinate-wise median (the mean of the two middle values when K is even).
  Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018
  (arXiv:1803.01498).
- ``trimmed_mean``: per coordinate, drop the b = floor(trim_frac * K) largest and the b smallest values and
  average the K - 2b left (Yin et al. 2018, the same paper).
- ``krum``: score(i) = sum of the squared distances ||Delta_i - Delta_j||^2 to the K - f - 2 nearest other
  changes; the change of lowest score wins. ``multi_krum``: the mean of the m = K - f changes of lowest
  score. Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017. Both need K > 2f + 2.

Norm bounding (``max_update_norm`` M; Sun et al., "Can You Really Backdoor Federated Learning?", arXiv:1911.07963):
every change is first scaled to Delta_i * min(1, M / ||Delta_i||_2) (:func:`clip_rows`, DP-FedAvg's clipping), then
combined by the rule. A boosted (model-replacement) change is cut to length M; honest changes shorter than M pass
unchanged. The paper's "weak differential privacy", norm bounding plus Gaussian noise, is ``strategy.privacy``.

Robust rules give every update one vote: the sample counts behind the weights p are what the clients say,
so an attacker could claim a huge one. Their result is multiplied by sum_i p_i, so that it has the size of
step the weights imply (1 for FedAvg's sample weights; FedBuff's mean staleness factor s(tau)).

Differential privacy (:class:`Aggregation` with a ``PrivacyConfig``): DP-FedAvg, McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018 (arXiv:1710.06963), at the level of clients:

    Delta_i <- Delta_i * min(1, C / ||Delta_i||_2)                    (each client's change clipped)
    Delta   =  (sum_{i in round} Delta_i + N(0, (z C)^2 I)) / m        (m = the expected clients a round)

This is the paper's fixed-denominator estimator with every client weighted 1 (the paper allows weights
w_k = min(n_k / w_hat, 1); uniform ones need no trust in the clients' sample counts). Dividing by the
number that actually arrived instead would make the denominator itself depend on whether a client took
part; with the fixed m, adding or removing one client moves the sum by at most C, which is what the
Gaussian noise of standard deviation z C is calibrated to. With dropouts or a deadline fewer than m arrive
and the step shrinks by arrivals / m: a bias toward zero, never a loss of privacy. The noise is drawn from
the server's random stream (``server.rng``), so a run is reproducible from its seed.

The privacy budget: each round is a Gaussian mechanism of noise multiplier z on a sample of the clients
with rate q = clients_per_round / n_clients; dp_accounting's Renyi-DP accountant composes T of them and
converts to epsilon at ``delta``. It treats the sampling as Poisson sampling (each client independently
with probability q), which approximates the uniform sampling of a fixed number without replacement that
rounds do. It also assumes every client is available to every round's sampling: with clients offline
(``devices.availability``) a round samples from fewer, the real rate is larger, and the epsilon reported
is optimistic. Robust rules are refused with privacy: the accounting is for the clipped sum, whose
sensitivity to one client is C; a median or Krum's choice has no such bound.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from hetfl.config import AggregatorConfig, PrivacyConfig
from hetfl.errors import ConfigError

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum")


def combine(
    deltas: torch.Tensor, weights: torch.Tensor, rule: str, *, trim_frac: float = 0.1, byzantine: int = 1
) -> torch.Tensor:
    """Combine the K x d changes ``deltas`` by ``rule`` (see the module docstring); a vector of length d.

    ``weights`` (K,) are the algorithm's mean weights: ``mean`` is ``deltas.T @ weights``; the robust rules
    ignore each weight and scale their result by ``weights.sum()``.
    """
    if deltas.dim() != 2 or weights.shape != (deltas.shape[0],):
        raise ValueError(f"expected K x d changes and K weights, got {tuple(deltas.shape)} and {tuple(weights.shape)}")
    k = deltas.shape[0]
    if k == 0:
        raise ValueError("no changes to combine")
    if rule == "mean":
        return deltas.T @ weights
    if rule == "median":
        ordered = deltas.sort(dim=0).values
        middle = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
        return middle * weights.sum()
    if rule == "trimmed_mean":
        if not 0 <= trim_frac < 0.5:
            raise ValueError(f"trim_frac must lie in [0, 0.5), got {trim_frac}")
        b = math.floor(trim_frac * k)
        return deltas.sort(dim=0).values[b : k - b].mean(dim=0) * weights.sum()
    if rule in ("krum", "multi_krum"):
        check_krum(k, byzantine, rule)
        scores = krum_scores(deltas, byzantine)
        best = torch.argsort(scores, stable=True)[: 1 if rule == "krum" else k - byzantine]
        return deltas[best].mean(dim=0) * weights.sum()
    raise ValueError(f"unknown aggregation rule '{rule}' (known: {', '.join(RULES)})")


def check_krum(k: int, byzantine: int, rule: str = "krum") -> None:
    """Krum's condition: K > 2f + 2 updates (raise ValueError with the numbers otherwise)."""
    if byzantine < 0:
        raise ValueError(f"byzantine must be non-negative, got {byzantine}")
    if k <= 2 * byzantine + 2:
        raise ValueError(f"{rule} with f = {byzantine} needs more than 2f + 2 = {2 * byzantine + 2} updates, got {k}")


def krum_scores(deltas: torch.Tensor, byzantine: int) -> torch.Tensor:
    """score(i) = sum of the K - f - 2 smallest ||Delta_i - Delta_j||^2 over j != i (float64)."""
    x = deltas.double()
    sq = (x * x).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    dist.fill_diagonal_(float("inf"))  # never one's own neighbour
    nearest = deltas.shape[0] - byzantine - 2
    return dist.sort(dim=1).values[:, :nearest].sum(dim=1)


def clip_rows(deltas: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row scaled by min(1, clip / ||row||_2): rows no longer than ``clip`` are unchanged."""
    norms = torch.linalg.vector_norm(deltas.double(), dim=1)
    factor = torch.clamp(clip / norms.clamp_min(1e-300), max=1.0).to(deltas.dtype)
    return deltas * factor[:, None]


def dp_epsilon(q: float, noise_multiplier: float, rounds: int, delta: float) -> float | None:
    """epsilon at ``delta`` after ``rounds`` Poisson-sampled Gaussian mechanisms (rate q, noise multiplier z),
    by dp_accounting's RDP accountant; 0 before any round, None when z = 0 (no finite guarantee)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return None
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant = RdpAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # at large q a few fractional orders do not converge; it says so, and drops them
    try:
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


class Aggregation:
    """A strategy's server-side combination of changes: the rule of ``aggregator`` and, if ``privacy.clip`` is
    set, DP-FedAvg (see the module docstring). Refuses, with a one-line ConfigError naming the key, what would
    be wrong: Krum with ``cohort`` (updates per aggregation, set by ``cohort_key``) <= 2f + 2, privacy with a
    robust rule, privacy without uniform client sampling.

    Parameters
    ----------
    aggregator, privacy
        The ``strategy.aggregator`` and ``strategy.privacy`` sections; None: the mean, no privacy.
    cohort : int
        Updates a strategy aggregates at once (clients_per_round, buffer_size): Krum's K, DP's expected m.
    cohort_key : str
        The config key that sets it, for error messages.
    uniform_sampling : bool
        Whether clients are sampled uniformly at random (the privacy accounting needs it).
    """

    def __init__(
        self,
        aggregator: AggregatorConfig | None = None,
        privacy: PrivacyConfig | None = None,
        *,
        cohort: int = 1,
        cohort_key: str = "strategy.clients_per_round",
        uniform_sampling: bool = True,
    ) -> None:
        self.aggregator = aggregator or AggregatorConfig()
        self.privacy = privacy if privacy is not None and privacy.enabled else None
        self.cohort = cohort
        rule, f = self.aggregator.rule, self.aggregator.byzantine
        if rule in ("krum", "multi_krum") and cohort <= 2 * f + 2:
            raise ConfigError(
                f"strategy.aggregator.byzantine: {rule} with f = {f} needs more than 2f + 2 = {2 * f + 2} updates per "
                f"aggregation; {cohort_key} is {cohort}"
            )
        if self.privacy is not None and rule != "mean":
            raise ConfigError(
                f"strategy.aggregator.rule: differential privacy is accounted for the clipped mean, not {rule} "
                "(its sensitivity to one client is not bounded by clip); use mean with strategy.privacy"
            )
        if self.privacy is not None and self.aggregator.max_update_norm is not None:
            raise ConfigError(
                "strategy.aggregator.max_update_norm: strategy.privacy.clip already bounds each change's norm; "
                "set one of the two"
            )
        if self.privacy is not None and not uniform_sampling:
            raise ConfigError(
                "strategy.selection.name: the privacy accounting assumes clients sampled uniformly at random; "
                "use random with strategy.privacy"
            )
        self.skipped = 0  # krum rounds with too few updates, left unchanged
        self.dp_rounds = 0  # noised aggregations so far
        self.sample_rate: float | None = None  # q, known at the first noised aggregation
        self.clipped = 0  # client changes clipping scaled down
        self.seen = 0  # client changes clipped or not
        self.bounded = 0  # client changes norm bounding (max_update_norm) scaled down
        self.bounded_seen = 0  # client changes it looked at
        self._epsilon: tuple[int, float | None] = (0, 0.0)  # cached (rounds, epsilon)

    @property
    def linear(self) -> bool:
        """Whether the result is the algorithm's weighted mean (so a sum, e.g. by secure aggregation, suffices)."""
        return self.aggregator.rule == "mean" and self.privacy is None and self.aggregator.max_update_norm is None

    def delta(self, server: Any, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The combined change of the K x d ``deltas`` whose mean weights are ``weights``."""
        if self.privacy is not None:
            return self._private(server, deltas)
        cfg = self.aggregator
        if cfg.max_update_norm is not None:
            norms = torch.linalg.vector_norm(deltas.double(), dim=1)
            self.bounded += int((norms > cfg.max_update_norm).sum())
            self.bounded_seen += deltas.shape[0]
            deltas = clip_rows(deltas, cfg.max_update_norm)
        if cfg.rule in ("krum", "multi_krum") and deltas.shape[0] <= 2 * cfg.byzantine + 2:
            self.skipped += 1  # a round that lost clients (deadline, dropouts): no robust choice is possible
            return torch.zeros(deltas.shape[1], dtype=deltas.dtype)
        return combine(deltas, weights, cfg.rule, trim_frac=cfg.trim_frac, byzantine=cfg.byzantine)

    def _private(self, server: Any, deltas: torch.Tensor) -> torch.Tensor:
        p = self.privacy
        assert p is not None and p.clip is not None
        n = server.n_clients
        m = min(self.cohort, n)
        self.sample_rate = m / n
        clipped = clip_rows(deltas, p.clip)
        norms = torch.linalg.vector_norm(deltas.double(), dim=1)
        self.clipped += int((norms > p.clip).sum())
        self.seen += deltas.shape[0]
        out = clipped.T @ torch.full((deltas.shape[0],), 1 / m, dtype=deltas.dtype)
        if p.noise_multiplier > 0:
            noise = server.rng.standard_normal(deltas.shape[1]) * (p.noise_multiplier * p.clip / m)
            out = out + torch.from_numpy(noise).to(out.dtype)
        self.dp_rounds += 1
        return out

    def epsilon(self) -> float | None:
        """epsilon spent so far at ``privacy.delta`` (see :func:`dp_epsilon`)."""
        p = self.privacy
        assert p is not None
        if self._epsilon[0] != self.dp_rounds:
            q = self.sample_rate if self.sample_rate is not None else 1.0
            self._epsilon = (self.dp_rounds, dp_epsilon(q, p.noise_multiplier, self.dp_rounds, p.delta))
        return self._epsilon[1]

    def metrics(self) -> dict[str, Any]:
        """``dp_epsilon``, ``dp_delta``, ``dp_clipped_frac`` with privacy; ``robust_skipped`` with Krum;
        ``norm_bounded_frac`` with ``max_update_norm``."""
        out: dict[str, Any] = {}
        if self.aggregator.max_update_norm is not None:
            out["norm_bounded_frac"] = self.bounded / self.bounded_seen if self.bounded_seen else None
        if self.privacy is not None:
            out["dp_epsilon"] = self.epsilon()
            out["dp_delta"] = self.privacy.delta
            out["dp_clipped_frac"] = self.clipped / self.seen if self.seen else None
        if self.aggregator.rule in ("krum", "multi_krum"):
            out["robust_skipped"] = self.skipped
        return out

    def summary(self) -> dict[str, Any]:
        """The privacy spent by the whole run (``dp_epsilon``, ``dp_delta``, ``dp_rounds``); {} without privacy."""
        if self.privacy is None:
            return {}
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.privacy.delta, "dp_rounds": self.dp_rounds}
