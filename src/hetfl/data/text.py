"""Byte-level text for federated language-model fine-tuning, from sources that ship with Python.

Nothing is downloaded: every style is read from the running interpreter's standard library, so a
federation of text clients works offline. The styles differ in vocabulary, layout and punctuation:

===========  ==============================================================  ==========
``code``     source of the top-level ``*.py`` modules of the standard library  always
             (sorted by file name, the first ~1.5 MB; private ``_*.py`` modules
             and the data-table modules of :data:`CODE_SKIP` left out)
``prose``    the reference-manual topics behind ``help()``                    always
             (``pydoc_data.topics``, English technical prose, ~0.5 MB)
``legal``    the interpreter's ``LICENSE.txt`` (license terms, ~14 kB)         if present
``mail``     e-mail messages of the ``email`` package's tests                  if present
             (``test/test_email/data/msg_*.txt``: headers, MIME parts)
===========  ==============================================================  ==========

:func:`available_styles` lists what this install has. Text is tokenised as UTF-8 bytes (vocabulary
256, :func:`encode`). :func:`client_corpora` gives client ``i`` the style ``styles[i % S]`` and a window
of ``tokens_per_client`` consecutive bytes of it: the style's text is cut into one equal segment per
client of that style (assigned in a seeded random order) and each window starts at a seeded random
offset inside its segment, so clients of one style hold disjoint text when it is long enough
(otherwise windows start anywhere and may overlap).
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hetfl.errors import DataError

VOCAB_SIZE = 256
"""Byte-level vocabulary: a token is one byte of UTF-8."""

CODE_BYTES = 1_500_000
"""How much standard-library source the ``code`` style reads."""

CODE_SKIP = frozenset({"stringprep.py", "token.py", "opcode.py", "locale.py", "this.py"})
"""Modules that are mostly data tables (or rot13 text), left out of ``code`` with private ``_*.py`` ones."""


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _code() -> str:
    parts, size = [], 0
    for path in sorted(_stdlib().glob("*.py")):
        if path.name.startswith("_") or path.name in CODE_SKIP:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= CODE_BYTES:
            break
    return "\n".join(parts)


def _prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _legal() -> str:
    return (_stdlib() / "LICENSE.txt").read_text(encoding="utf-8", errors="replace")


def _mail() -> str:
    files = sorted((_stdlib() / "test" / "test_email" / "data").glob("msg_*.txt"))
    if not files:
        raise FileNotFoundError("no msg_*.txt")
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


SOURCES = {"code": _code, "prose": _prose, "legal": _legal, "mail": _mail}


@functools.lru_cache(maxsize=None)
def style_text(style: str) -> str:
    """The whole text of one style (read once, then cached)."""
    if style not in SOURCES:
        raise DataError(f"unknown text style {style!r}; available here: {', '.join(available_styles())}")
    try:
        text = SOURCES[style]()
    except (OSError, ImportError) as exc:
        raise DataError(
            f"text style {style!r} is not in this Python install ({exc}); available here: "
            f"{', '.join(available_styles())}"
        ) from exc
    if not text:
        raise DataError(f"text style {style!r} is empty in this Python install")
    return text


@functools.lru_cache(maxsize=1)
def available_styles() -> tuple[str, ...]:
    """The styles whose sources this interpreter has, in the order of the table above."""
    found = []
    for style, source in SOURCES.items():
        try:
            if source():
                found.append(style)
        except (OSError, ImportError):
            pass
    return tuple(found)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int64 token ids in ``[0, 256)``."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(tokens: np.ndarray) -> str:
    """Token ids back to text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


class ClientTexts(NamedTuple):
    """Token arrays per client and the style of each; unpacks as ``tokens, styles``."""

    tokens: list[np.ndarray]
    styles: list[str]


def client_corpora(
    n_clients: int,
    styles: tuple[str, ...] = ("code", "prose"),
    seed: int = 0,
    *,
    tokens_per_client: int = 4096,
) -> ClientTexts:
    """``tokens_per_client`` bytes of text for each of ``n_clients`` clients, styles assigned round-robin.

    Parameters
    ----------
    n_clients : int
        Number of clients.
    styles : tuple of str, default ("code", "prose")
        Styles to use (see :func:`available_styles`); client ``i`` gets ``styles[i % len(styles)]``.
    seed : int, default 0
        Seeds the segment order and window offsets; the same seed gives the same corpora.
    tokens_per_client : int, default 4096
        Length of every client's token array.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients must be positive; got {n_clients}")
    if not styles:
        raise ValueError("styles must name at least one style")
    rng = np.random.default_rng(seed)
    labels = [styles[i % len(styles)] for i in range(n_clients)]
    tokens: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n_clients
    for style in dict.fromkeys(styles):
        members = [i for i, s in enumerate(labels) if s == style]
        if not members:
            continue
        data = encode(style_text(style))
        n, m, T = data.size, len(members), tokens_per_client
        if T < 1 or T > n:
            raise ValueError(f"tokens_per_client must be in 1..{n} for style {style!r}; got {T}")
        segment = n // m
        if segment >= T:  # disjoint: one segment per client, random offset inside it
            order = rng.permutation(m)
            starts = [order[j] * segment + rng.integers(0, segment - T + 1) for j in range(m)]
        else:
            starts = list(rng.integers(0, n - T + 1, size=m))
        for i, start in zip(members, starts):
            tokens[i] = data[start : start + T].copy()
    return ClientTexts(tokens, labels)


def byte_histogram(tokens: np.ndarray) -> np.ndarray:
    """Relative frequency of each of the 256 byte values."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=VOCAB_SIZE).astype(np.float64)
    return counts / counts.sum()


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance ``sqrt(JS(p, q))`` with base-2 logarithms, in [0, 1].

    ``JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2``, ``m = (p + q) / 2``.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def lm_windows(tokens: np.ndarray, context: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random rows of ``context + 1`` consecutive tokens ``(n, context + 1)``: inputs and next-token targets."""
    tokens = np.asarray(tokens)
    if tokens.size < context + 1:
        raise ValueError(f"need at least context + 1 = {context + 1} tokens; got {tokens.size}")
    starts = rng.integers(0, tokens.size - context, size=n)
    return np.stack([tokens[s : s + context + 1] for s in starts])
