"""A pretrained TinyLM base, made in-project from text that ships with Python, and cached on disk.

Federated fine-tuning starts from a pretrained model; nothing may be downloaded, so hetfl pretrains its
own tiny one (``model.pretrained: true``, settings in ``model.pretrain``):

- **Corpus.** The federation's styles (``data.text.styles``), mixed evenly: every row of a batch picks a
  style uniformly, then a window of ``context + 1`` bytes of that style's text
  (:func:`hetfl.data.text.style_text`). The clients' text is cut out first: every client's stream
  (:func:`hetfl.data.text.client_corpora` with the run's seed) is located in its style's text and no
  pretraining window touches it, so the base never saw a client's training or test bytes. A style
  whose text is all taken by clients (``legal`` is 14 kB) is left out; if every style is, it is an error.
- **Training.** ``steps`` Adam steps of ``batch_size`` windows at learning rate ``lr`` on the mean
  next-token cross-entropy (:func:`hetfl.models.transformer.lm_loss`), from an initialisation drawn
  with ``seed``; the batches come from a generator of the same seed. Deterministic for a seed (on one
  machine and torch version).
- **Cache.** The weights are saved to ``<cache_dir>/tinylm-<key>.pt``, ``key`` a hash of everything they
  depend on (model sizes, pretraining settings, styles, clients' text: ``n_clients``,
  ``tokens_per_client``, the run's seed); the next run with the same key loads them instead of training.
  ``cache_dir``: ``model.pretrain.cache_dir``, else ``$HETFL_CACHE``, else ``~/.cache/hetfl``.

The reported perplexity is on 256 held-out windows of the same (client-free) corpus, drawn with another
generator: how well the base models the styles in general; the run's round-0 ``perplexity`` is the same
base on the clients' own test windows. With the defaults (d_model 32, 4 heads, d_ff 64, 2 layers, context
32, 600 Adam steps of 32 windows at lr 0.01, styles code and prose) pretraining took about 8 s on one
thread of a busy 2-core machine and reached a held-out perplexity of 10.1 (300 steps at lr 0.003: 16.3;
1000 steps: 10.4 at lr 0.003); an untrained model scores about 256, one byte in 256. ``examples/lora_text.yaml``
starts from 10.1 on the clients' test windows. A larger base is the same keys: ``examples/fedspine_text_1m.yaml``
(d_model 128, 4 heads, d_ff 768, 4 layers: 1,093,376 parameters; 1000 steps at lr 0.003) reached a held-out
perplexity of 6.12 after about 190 s of CPU time on one thread (892 s of wall time on a 2-core machine shared
with a dozen other processes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hetfl.cache import default_cache_dir
from hetfl.config import DataConfig, PretrainConfig
from hetfl.data.text import client_corpora, encode, style_text
from hetfl.errors import DataError
from hetfl.models.transformer import TinyLM, lm_loss

FORMAT = 1  # bump when what the cached weights mean changes
VALIDATION_WINDOWS = 256


@dataclass
class Pretrained:
    """What :func:`load_or_pretrain` did: where the weights are, whether they were cached, how good they are."""

    path: Path
    cached: bool
    perplexity: float
    styles: tuple[str, ...]
    seconds: float = 0.0


def cache_dir(cfg: PretrainConfig) -> Path:
    """``cfg.cache_dir``, else ``$HETFL_CACHE``, else ``~/.cache/hetfl``."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def cache_key(model: TinyLM, cfg: PretrainConfig, data: DataConfig, seed: int) -> str:
    """A hash of everything the pretrained weights depend on."""
    what = {
        "format": FORMAT, "sizes": model.sizes(), "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "seed": cfg.seed, "styles": list(data.text.styles), "n_clients": data.n_clients,
        "tokens_per_client": data.text.tokens_per_client, "data_seed": seed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def corpus(data: DataConfig, seed: int, length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per style, its text's tokens and the starts of every window of ``length`` bytes that touches no client's text.

    Styles without such a window are left out.
    """
    clients = client_corpora(data.n_clients, tuple(data.text.styles), seed, tokens_per_client=data.text.tokens_per_client)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for style in dict.fromkeys(data.text.styles):
        tokens = encode(style_text(style))
        raw = tokens.astype(np.uint8).tobytes()
        taken = np.zeros(len(tokens) + 1, dtype=np.int64)  # +1 at a client's first byte, -1 after its last
        for stream, s in zip(clients.tokens, clients.styles):
            if s != style:
                continue
            start = raw.find(stream.astype(np.uint8).tobytes())
            if start < 0:
                raise RuntimeError(f"a client's {style} text is not in the {style} text")  # cannot happen
            taken[start] += 1
            taken[start + len(stream)] -= 1
        inside = np.cumsum(taken[:-1]) > 0  # byte i belongs to some client
        bad = np.concatenate([[0], np.cumsum(inside)])  # bad[j] = client bytes before position j
        starts = np.flatnonzero(bad[length:] - bad[: len(bad) - length] == 0)  # windows [s, s + length) free of them
        if len(starts):
            out[style] = (tokens, starts)
    if not out:
        raise DataError(
            "model.pretrained: the clients hold all the text of every style in data.text.styles, so nothing is left "
            "to pretrain on; lower data.text.tokens_per_client or data.n_clients, or add a style"
        )
    return out


def sample_rows(parts: dict[str, tuple[np.ndarray, np.ndarray]], n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` windows of ``length`` tokens: each of a style drawn uniformly, at a start drawn uniformly in it."""
    styles = list(parts)
    which = rng.integers(len(styles), size=n)
    rows = np.empty((n, length), dtype=np.int64)
    for k, style in enumerate(styles):
        idx = np.flatnonzero(which == k)
        tokens, starts = parts[style]
        chosen = starts[rng.integers(len(starts), size=len(idx))]
        rows[idx] = tokens[chosen[:, None] + np.arange(length)]
    return torch.from_numpy(rows)


def pretrain(model: TinyLM, cfg: PretrainConfig, data: DataConfig, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """Pretrain a fresh TinyLM of ``model``'s sizes; its ``state_dict`` and held-out perplexity. ``model`` is not touched."""
    length = model.context + 1
    parts = corpus(data, seed, length)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        net = TinyLM(**model.sizes())
    rng = np.random.default_rng([cfg.seed, 1])
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    for _ in range(cfg.steps):
        loss = lm_loss(net, sample_rows(parts, cfg.batch_size, length, rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = sample_rows(parts, VALIDATION_WINDOWS, length, np.random.default_rng([cfg.seed, 2]))
    with torch.no_grad():
        ppl = math.exp(float(lm_loss(net, held_out)))
    if not math.isfinite(ppl):
        raise DataError(f"model.pretrain.lr: pretraining diverged (perplexity {ppl}); lower model.pretrain.lr")
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, ppl


def load_base(model: TinyLM, state: dict[str, torch.Tensor]) -> None:
    """Load the pretrained base ``state`` into ``model``; a soft prompt (``model.prompt_tokens``), which the base
    has not, is set from the pretrained embeddings (:meth:`~hetfl.models.transformer.TinyLM.reset_prompt`)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"prompt"}:
        raise RuntimeError(f"the pretrained base does not fit the model: missing {missing}, unexpected {unexpected}")
    model.reset_prompt()  # blanks in the pretrained embedding space


def load_or_pretrain(model: TinyLM, cfg: PretrainConfig, data: DataConfig, seed: int) -> Pretrained:
    """Load the pretrained weights for ``model`` into it, pretraining (and caching) them first if none are cached.

    ``data`` and ``seed`` are the run's: they say which text the clients hold (left out of the corpus).
    """
    import time

    path = cache_dir(cfg) / f"tinylm-{cache_key(model, cfg, data, seed)}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        load_base(model, saved["state"])
        return Pretrained(path, True, float(saved["perplexity"]), tuple(saved["styles"]))
    started = time.perf_counter()
    state, ppl = pretrain(model, cfg, data, seed)
    seconds = time.perf_counter() - started
    styles = tuple(corpus(data, seed, model.context + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state": state, "perplexity": ppl, "styles": list(styles)}, tmp)
    os.replace(tmp, path)
    load_base(model, state)
    return Pretrained(path, False, ppl, styles, seconds)
