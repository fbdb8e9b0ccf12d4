"""Vectorised local training: K clients' tasks of one architecture as one batched computation.

:func:`train_many` runs what ``K`` calls of :meth:`LocalTrainer.train` would, but each local step
is one ``torch.func.vmap(grad_and_value(loss))`` over the clients' stacked parameters instead of
``K`` forward/backward passes, and the optimiser update is one vector operation on a ``(K, P)``
tensor. The ``(K, P)`` rows use ``trainer.flat``'s layout (the model's floating-point buffers, then its
parameters in ``model.parameters()`` order), so a row is interchangeable with a ``LocalTrainer.train`` result.
Each row's buffers are passed to ``functional_call`` with its parameters and held constant: a model whose
training-mode forward changes its buffers (BatchNorm's running statistics), or whose gradient ``torch.func``
cannot batch (an in-place update of a captured tensor, a random layer under ``vmap``), cannot be trained
here; :meth:`LocalTrainer.batching_problem` finds that out once per trainer, and the engine then trains it
one task at a time (``training.vectorize``).

What stays per client, exactly as in sequential training:

- the mini-batch sequence: client ``k`` draws ``trainer.batches(n_k, steps_k, seed_k)``;
- the batch size ``min(batch_size, n_k)``: batches are padded to the largest one with a per-sample
  mask, and the loss is the sum of the real samples' cross-entropies over their count (what
  ``F.cross_entropy`` averages on the unpadded batch);
- the number of steps: clients are sorted by steps (most first), so the clients still training at
  step ``t`` are a prefix of the rows and the others are left untouched (no masked update needed);
- the optimiser's state: SGD (momentum, weight decay; dampening 0, no Nesterov) and Adam (L2 weight
  decay, bias-corrected), written out as ``torch.optim.SGD`` and ``torch.optim.Adam`` compute them.

Results equal the sequential ones up to floating-point summation order (batched matrix products, a
masked sum instead of a mean): differences of order 1e-7 after a few steps, often none at all; the
tests hold them to ``allclose(atol=1e-5, rtol=1e-4)`` (see ``tests/test_vectorized.py``).

Everything runs on ``trainer.device``: the starting rows, the clients' data and the per-client terms are moved
there (a no-op for what the engine already keeps there: the clients' data), the batch indices are drawn on the
CPU (the same seeded sequences as sequential training) and moved once per call, and the results' parameters stay
on the device.

The clients' data are concatenated once per call (not padded to ``(K, N_max)``, which with skewed
client sizes would multiply memory by ``N_max / mean(n_k)``), and every step gathers its ``(k_t, B)``
batch from it with one index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call, grad_and_value, vmap

from hetfl.errors import DivergedError
from hetfl.training.local import LocalResult, LocalTrainer, task_loss

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as LocalTrainer.optimizer builds it
ADAM_EPS = 1e-8

GradFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def train_many(
    trainer: LocalTrainer,
    starts: torch.Tensor,
    datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: Sequence[int],
    seeds: Sequence[int],
    *,
    lr: float | None = None,
    prox_mu: float = 0.0,
    correction: torch.Tensor | None = None,
    grad_mask: torch.Tensor | None = None,
) -> list[LocalResult]:
    """Train K clients' tasks of ``trainer``'s architecture together; the same results as K ``trainer.train`` calls.

    Parameters
    ----------
    trainer : LocalTrainer
        The architecture and ``training`` config (optimiser, lr, momentum, weight decay, batch size).
        Its model is used functionally; its flat buffers are not touched.
    starts : torch.Tensor
        ``(K, P)`` starting states, one row per client, in ``trainer.flat``'s layout (buffers, then parameters).
    datasets : sequence of (x, y)
        Each client's training samples (``n_k >= 1``); sizes may differ.
    steps : sequence of int
        Local steps of each client (``>= 0``).
    seeds : sequence of int
        Each client's batch seed, as ``trainer.train(seed=...)``.
    lr : float, optional
        Learning rate; default ``trainer.cfg.lr``.
    prox_mu : float, default 0.0
        FedProx: ``mu * (w - start)`` is added to every gradient.
    correction : torch.Tensor, optional
        ``(P,)`` or ``(K, P)``, added to every gradient (SCAFFOLD's ``c - c_i``); its buffer entries are unused.
    grad_mask : torch.Tensor, optional
        ``(P,)`` or ``(K, P)``, multiplies the gradient after the two terms above (0 freezes an entry); its
        buffer entries are unused (buffers are constant here, as the probe checks).

    Returns
    -------
    list of LocalResult
        One per client, in the order given: parameters (on ``trainer.device``), steps, mean training loss over the
        steps.

    Raises
    ------
    DivergedError
        If a client's loss or parameters become non-finite (as ``LocalTrainer.train``).
    """
    k_clients = len(datasets)
    n_params = trainer.numel
    if starts.shape != (k_clients, n_params):
        raise ValueError(
            f"starts must be ({k_clients}, {n_params}) for {k_clients} datasets; got {tuple(starts.shape)}"
        )
    if len(steps) != k_clients or len(seeds) != k_clients:
        raise ValueError(f"{k_clients} datasets need as many steps and seeds; got {len(steps)} and {len(seeds)}")
    sizes = [int(x.shape[0]) for x, _ in datasets]
    for k, (n, s) in enumerate(zip(sizes, steps)):
        if n < 1 or s < 0:
            raise ValueError(f"client {k}: needs at least one sample and steps >= 0 (got {n} samples, {s} steps)")
    if k_clients == 0:
        return []
    cfg = trainer.cfg
    lr = cfg.lr if lr is None else lr
    device = trainer.device

    # Rows sorted by steps, most first: the clients training at step t are rows [:active[t]].
    order = sorted(range(k_clients), key=lambda k: -steps[k])
    rank = torch.tensor(order)
    n_steps = [steps[k] for k in order]
    total = n_steps[0]
    active = [sum(1 for s in n_steps if s > t) for t in range(total)]

    # Data: concatenated once; idx[t, j, b] is the b-th sample of row j's batch at step t.
    x_all = torch.cat([datasets[k][0].to(device) for k in order])
    y_all = torch.cat([datasets[k][1].to(device) for k in order])
    batch = [min(cfg.batch_size, sizes[k]) for k in order]
    width = max(batch)
    idx = torch.zeros(total, k_clients, width, dtype=torch.long)
    offset = 0
    for j, k in enumerate(order):
        if n_steps[j]:
            idx[: n_steps[j], j, : batch[j]] = torch.stack(list(trainer.batches(sizes[k], steps[k], seeds[k]))) + offset
        offset += sizes[k]
    padded = any(b < width for b in batch)
    mask = (torch.arange(width) < torch.tensor(batch)[:, None]).to(device, torch.float32)
    idx, rank, starts = idx.to(device), rank.to(device), starts.to(device)
    correction = None if correction is None else correction.to(device)
    grad_mask = None if grad_mask is None else grad_mask.to(device)

    nb = trainer.n_buffers  # the buffers: held constant, passed to the model with each row's parameters
    buffers = starts[rank, :nb]
    params = starts[rank, nb:].clone()
    anchor = params.clone() if prox_mu else None
    corr = _rows(correction, rank, k_clients, n_params, "correction")
    gmask = _rows(grad_mask, rank, k_clients, n_params, "grad_mask")
    corr, gmask = (None if r is None else r[:, nb:] for r in (corr, gmask))
    opt = _Optimizer(cfg.optimizer, lr, cfg.momentum, cfg.weight_decay, params.shape, device)
    grad_fn = batched_grad(trainer, masked=padded)
    loss_sum = torch.zeros(k_clients, device=device)
    with trainer.training(what="batched training"):
        for t in range(total):
            a = active[t]
            p = params[:a]
            xb, yb = x_all[idx[t, :a]], y_all[idx[t, :a]]
            g, loss = grad_fn(p, buffers[:a], xb, yb, mask[:a]) if padded else grad_fn(p, buffers[:a], xb, yb)
            if anchor is not None:
                g.add_(p - anchor[:a], alpha=prox_mu)
            if corr is not None:
                g.add_(corr[:a])
            if gmask is not None:
                g.mul_(gmask[:a])
            opt.step(p, g, t)
            loss_sum[:a] += loss

    results: list[LocalResult | None] = [None] * k_clients
    finite = torch.isfinite(params).all(dim=1).tolist()
    for j, (k, s, total_loss) in enumerate(zip(order, n_steps, loss_sum.tolist())):
        mean_loss = total_loss / max(s, 1)
        if not math.isfinite(mean_loss) or not finite[j]:
            raise DivergedError(
                f"training diverged on client {k} of {k_clients} (loss {mean_loss}); lower training.lr or check "
                "the data normalisation"
            )
        results[k] = LocalResult(torch.cat([buffers[j], params[j]]), s, mean_loss)
    return results  # type: ignore[return-value]


def batched_grad(trainer: LocalTrainer, *, masked: bool) -> GradFn:
    """Batched gradients of ``trainer``'s model: ``(params, buffers, x, y[, mask]) -> (grads, losses)``.

    Shapes: params ``(k, P)`` (the parameter entries of ``trainer.flat``, after its ``n_buffers`` buffer
    entries), buffers ``(k, n_buffers)``, x ``(k, B, ...)``, y and mask ``(k, B)``; grads ``(k, P)`` (with
    respect to the parameters only: buffers are constants), losses ``(k,)``. The model runs in whatever
    mode it is in (``train_many``: training mode).

    Each row's loss is the cross-entropy of its batch; with ``masked``, the mean over the samples whose
    mask is 1 (the others are padding).
    """
    model = trainer.model
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    buffer_names, buffer_shapes = trainer.buffer_names, trainer.buffer_shapes
    buffer_numels = [math.prod(shape) for shape in buffer_shapes]

    def logits(flat: torch.Tensor, bufs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # split (not slicing) so that the gradient of the pieces is assembled with one cat
        weights = {n: w.view(s) for n, w, s in zip(names, flat.split(numels), shapes)}
        if buffer_names:
            weights.update({n: b.view(s) for n, b, s in zip(buffer_names, bufs.split(buffer_numels), buffer_shapes)})
        return functional_call(model, weights, (x,))

    def loss(flat: torch.Tensor, bufs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(logits(flat, bufs, x), y)

    def masked_loss(flat: torch.Tensor, bufs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    m: torch.Tensor) -> torch.Tensor:
        per_token = task_loss(logits(flat, bufs, x), y, reduction="none").reshape(y.shape)
        per_sample = per_token.flatten(1).mean(1) if per_token.dim() > 1 else per_token  # a sequence: its tokens' mean
        return (per_sample * m).sum() / m.sum()

    return vmap(grad_and_value(masked_loss if masked else loss))


class _Optimizer:
    """``torch.optim.SGD`` or ``torch.optim.Adam`` (other arguments at their defaults) on ``(K, P)`` rows."""

    def __init__(self, kind: str, lr: float, momentum: float, weight_decay: float, shape: torch.Size,
                 device: torch.device | None = None) -> None:
        self.kind, self.lr, self.momentum, self.weight_decay = kind, lr, momentum, weight_decay
        if kind == "adam":
            self.exp_avg, self.exp_avg_sq = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        elif kind == "sgd":
            self.buf = torch.zeros(shape, device=device) if momentum else None
        else:
            raise NotImplementedError(f"train_many: optimizer {kind!r}; only sgd and adam are vectorised")

    def step(self, p: torch.Tensor, g: torch.Tensor, t: int) -> None:
        """One update of the rows ``p`` (a view, updated in place) with gradient ``g``; ``t``: steps taken before."""
        a = p.shape[0]
        if self.weight_decay:
            g = g.add(p, alpha=self.weight_decay)
        if self.kind == "sgd":
            if self.buf is not None:
                buf = self.buf[:a]
                if t == 0:
                    buf.copy_(g)
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)
            return
        beta1, beta2 = ADAM_BETAS
        exp_avg, exp_avg_sq = self.exp_avg[:a], self.exp_avg_sq[:a]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = float(t + 1)
        step_size = self.lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(ADAM_EPS)
        p.addcdiv_(exp_avg, denom, value=-step_size)


def _rows(term: torch.Tensor | None, rank: torch.Tensor, k: int, n: int, name: str) -> torch.Tensor | None:
    """A ``(P,)`` or ``(K, P)`` per-client term as ``(K, P)`` rows in the sorted order (``(P,)``: a broadcast view)."""
    if term is None:
        return None
    if term.shape == (n,):
        return term.expand(k, n)
    if term.shape == (k, n):
        return term[rank]
    raise ValueError(f"{name} must be ({n},) or ({k}, {n}); got {tuple(term.shape)}")
