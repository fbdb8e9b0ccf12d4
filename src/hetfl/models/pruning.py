"""Structured pruning of TinyLM (attention heads and FFN channels) and the costs a device pays for a model.

FedSpine (Yao et al., "Efficient Deployment of Large Language Models on Resource-constrained Devices",
arXiv:2501.02438) prunes the base model structurally and tunes LoRA on what remains, iteratively, with
a pruning ratio per device. The rule here, per layer ``l`` with ``H_l`` heads and ``F_l`` FFN channels::

    keep_heads_l    = H_l - floor(ratio * H_l)      (at least 1)
    keep_channels_l = F_l - floor(ratio * F_l)      (at least 1)
    keep the highest-scored heads / channels, in their original order; ties keep the lower index

Importance of a group ``G`` (a head: its ``d_head`` rows of q, k, v with their biases and its
``d_head`` columns of o; an FFN channel: its row of fc1 with the bias and its column of fc2)::

    with a batch (first-order Taylor, as LLM-Pruner, Ma et al. arXiv:2305.11627, per element):
        I(G) = sum_{w in G} |w * dL/dw|            L = next-token loss on the batch
    without one (magnitude):
        I(G) = sqrt( sum_{w in G} w^2 )

o's bias and fc2's bias belong to no head or channel (they are kept). The Taylor score estimates how
much the loss changes when the group is zeroed; the magnitude score needs no data. Pruning makes a new,
smaller :class:`~hetfl.models.transformer.TinyLM` (the Linear layers are sliced, nothing is masked).

With LoRA attached, the adapters are sliced with their layers (rows of ``B`` where a layer loses
outputs: q, k, v, fc1; columns of ``A`` where it loses inputs: o, fc2), so pruning commutes with merging:
``merge_lora(prune(m)) == prune(merge_lora(m))``. Scores of an adapted model are those of its merged
weights ``W + s B A``. FedSpine's loop is prune, then tune LoRA, then merge and prune again; both orders
are supported.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hetfl.models.lora import LoRALinear, lora_modules, merge_lora
from hetfl.models.transformer import TinyLM, lm_loss


@dataclass
class Importance:
    """One score per head (``heads[l]``, shape ``(H_l,)``) and per FFN channel (``channels[l]``, ``(F_l,)``)."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]


def kept(n: int, ratio: float) -> int:
    """How many of ``n`` heads or channels survive pruning ``ratio``: ``n - floor(ratio * n)``, at least 1."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1); got {ratio}")
    return max(1, n - math.floor(ratio * n + 1e-9))


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _linear(m: nn.Module) -> nn.Linear:
    return m.base if isinstance(m, LoRALinear) else m


def importance(model: TinyLM, rows: torch.Tensor | None = None) -> Importance:
    """Scores of every head and FFN channel: Taylor ``|w * grad|`` on ``rows`` (N, L), else the L2 norm.

    The model is not modified (its gradients are untouched); adapters are merged into a copy first.
    """
    work = merge_lora(model) if lora_modules(model) else copy.deepcopy(model)
    if rows is not None:
        for p in work.parameters():
            p.requires_grad_(True)
            p.grad = None
        lm_loss(work, rows).backward()

    def term(p: torch.Tensor) -> torch.Tensor:  # element-wise contribution
        return (p * p.grad).abs() if rows is not None else p * p

    heads, channels = [], []
    with torch.no_grad():
        for block in work.blocks:
            attn, ff = block.attn, block.ff
            h, dh = attn.n_heads, attn.d_head
            score = term(attn.o.weight).T.reshape(h, -1).sum(1)
            for lin in (attn.q, attn.k, attn.v):
                score = score + term(lin.weight).reshape(h, -1).sum(1) + term(lin.bias).reshape(h, dh).sum(1)
            ch = term(ff.fc1.weight).sum(1) + term(ff.fc1.bias) + term(ff.fc2.weight).sum(0)
            if rows is None:
                score, ch = score.sqrt(), ch.sqrt()
            heads.append(score.clone())
            channels.append(ch.clone())
    return Importance(heads=heads, channels=channels)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores in increasing index order (ties: the lower index wins)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


@torch.no_grad()
def _slice(src: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A new Linear (or adapter) keeping output ``rows`` and input ``cols`` of ``src``."""
    base = _linear(src)
    W, b = base.weight, base.bias
    if rows is not None:
        W, b = W[rows], (b[rows] if b is not None else None)
    if cols is not None:
        W = W[:, cols]
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    lin.weight.copy_(W)
    if b is not None:
        lin.bias.copy_(b)
    if not isinstance(src, LoRALinear):
        return lin
    A, B = src.A, src.B
    if rows is not None:
        B = B[rows]
    if cols is not None:
        A = A[:, cols]
    out = LoRALinear(lin, rank=src.rank)
    out.scaling = src.scaling
    out.set_factors(A, B)
    return out


def prune(model: TinyLM, ratio: float, scores: Importance | None = None) -> TinyLM:
    """A new, smaller TinyLM without the lowest-scored ``ratio`` of heads and FFN channels in every layer.

    ``scores`` defaults to the magnitude scores of :func:`importance`. ``ratio = 0`` gives a copy with
    exactly the same outputs. Adapters are sliced along (see the module docstring). The global torch
    random state is the same afterwards.
    """
    scores = importance(model) if scores is None else scores
    shapes = [(b.attn.n_heads, b.ff.fc1.out_features) for b in model.blocks]
    if [(len(h), len(c)) for h, c in zip(scores.heads, scores.channels)] != shapes or len(scores.heads) != len(shapes):
        raise ValueError(f"scores do not match the model's (heads, channels) per layer {shapes}; recompute them")
    sizes = model.sizes()
    keep_h = [_top(s, kept(b.attn.n_heads, ratio)) for s, b in zip(scores.heads, model.blocks)]
    keep_f = [_top(s, kept(b.ff.fc1.out_features, ratio)) for s, b in zip(scores.channels, model.blocks)]
    sizes.update(n_heads=[len(k) for k in keep_h], d_ff=[len(k) for k in keep_f])
    with torch.random.fork_rng(devices=[]):  # the throw-away initialisations leave the global RNG alone
        return _build(model, TinyLM(**sizes), keep_h, keep_f)


def _build(model: TinyLM, new: TinyLM, keep_h: list[torch.Tensor], keep_f: list[torch.Tensor]) -> TinyLM:
    """Fill ``new`` (already of the pruned sizes) with the kept slices of ``model``."""
    new.tok, new.pos, new.ln_f = copy.deepcopy(model.tok), copy.deepcopy(model.pos), copy.deepcopy(model.ln_f)
    new.head = copy.deepcopy(model.head)
    for old_b, new_b, heads, chans in zip(model.blocks, new.blocks, keep_h, keep_f):
        dh = old_b.attn.d_head
        rows = (heads[:, None] * dh + torch.arange(dh)).reshape(-1)  # the heads' rows of q, k, v
        new_b.ln1, new_b.ln2 = copy.deepcopy(old_b.ln1), copy.deepcopy(old_b.ln2)
        for name in ("q", "k", "v"):
            setattr(new_b.attn, name, _slice(getattr(old_b.attn, name), rows=rows))
        new_b.attn.o = _slice(old_b.attn.o, cols=rows)
        new_b.ff.fc1 = _slice(old_b.ff.fc1, rows=chans)
        new_b.ff.fc2 = _slice(old_b.ff.fc2, cols=chans)
    adapters = lora_modules(new)
    if adapters:  # as after attach_lora: only the adapters train
        for p in new.parameters():
            p.requires_grad_(False)
        for m in adapters.values():
            m.A.requires_grad_(True)
            m.B.requires_grad_(True)
    return new


@torch.no_grad()
def inference_latency(model: nn.Module, batch: torch.Tensor, repeats: int = 10, warmup: int = 1) -> float:
    """Median wall-clock seconds of one forward pass on ``batch`` over ``repeats`` timed runs (``time.perf_counter``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}")
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times)


def memory_breakdown(
    model: TinyLM,
    rank: int,
    batch: int,
    context: int,
    *,
    targets: Sequence[str] = ("q", "v"),
    optimizer_states: int = 2,
    bytes_per_value: int = 4,
) -> dict[str, int]:
    """Estimated bytes of LoRA fine-tuning ``model`` with adapters of ``rank`` on ``targets``.

    Counted in values of ``bytes_per_value`` bytes (float32 by default)::

        parameters  = every base parameter (frozen, stored once)
        lora        = sum over adapted layers of rank * (d_in + d_out)
        gradients   = lora                     (only the adapters get gradients)
        optimizer   = optimizer_states * lora  (Adam: m and v -> 2; SGD: 0; SGD with momentum: 1)
        activations = batch * ( L*d                       token + position embeddings
                                + sum_layers block_l
                                + 2*L*d + L*V             final LN in/out, logits
                                + L*rank*n_adapted_outside_blocks )
        block_l     = 2*L*d                   LN1 in/out
                    + 3*L*H*dh + 2*H*L^2      q, k, v; attention scores and softmax
                    + L*H*dh + 2*L*d          heads' output; LN2 in/out
                    + 2*L*f                   fc1 output and its activation
                    + L*rank*n_adapted_l      x A^T of each adapter in the block

    with L = ``context``. This is what autograd keeps for the backward pass of the main tensors, to
    within small terms (biases, LayerNorm statistics, the loss's softmax); no allocator overheads.
    If ``model`` already has adapters, their layers are the adapted ones and ``rank`` replaces theirs.
    """
    adapters = lora_modules(model)
    if adapters:
        adapted = list(adapters.values())
        base_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith((".A", ".B")))
    else:
        adapted = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
        base_params = sum(p.numel() for p in model.parameters())
    lora = sum(rank * (m.in_features + m.out_features) for m in adapted)
    L, d = context, model.d_model
    in_blocks = {id(m) for block in model.blocks for m in block.modules()}
    outside = sum(1 for m in adapted if id(m) not in in_blocks)
    per_sample = L * d + 2 * L * d + L * model.vocab_size + L * rank * outside
    for block in model.blocks:
        inner = block.attn.n_heads * block.attn.d_head
        here = {id(m) for m in block.modules()}
        n_adapted = sum(1 for m in adapted if id(m) in here)
        per_sample += (2 * L * d + 3 * L * inner + 2 * block.attn.n_heads * L * L + L * inner
                       + 2 * L * d + 2 * L * block.ff.fc1.out_features + L * rank * n_adapted)
    values = {
        "parameters": base_params,
        "lora": lora,
        "gradients": lora,
        "optimizer": optimizer_states * lora,
        "activations": batch * per_sample,
    }
    parts = {k: bytes_per_value * v for k, v in values.items()}
    parts["total"] = sum(parts.values())
    return parts


def memory_bytes(model: TinyLM, rank: int, batch: int, context: int, **kwargs) -> int:
    """Total of :func:`memory_breakdown`: estimated training memory in bytes."""
    return memory_breakdown(model, rank, batch, context, **kwargs)["total"]
