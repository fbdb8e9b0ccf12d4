"""Credentials: client tokens (which secret a client presents, which client id it is, which tokens are
revoked) and the PEM files of TLS (:func:`read_pem`).

A token file is YAML::

    tokens:                 # token -> client id (0 .. data.n_clients - 1)
      7f3c...e1: 0
      a91b...04: 1
    revoked: [5d2e...9c]    # refused even if listed above

or CSV with a header ``token,client_id`` and an optional third column ``revoked`` (``yes``/``true``/``1``).
``hetfl tokens N --out tokens.yaml`` writes one with N random tokens. Tokens are compared in constant
time (:func:`hmac.compare_digest`), every token every time, so timing says nothing about which matched.
"""

from __future__ import annotations

import csv
import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hetfl.errors import HetflError

MIN_TOKEN_CHARS = 16


@dataclass
class TokenTable:
    tokens: dict[str, int]  # token -> client id
    revoked: set[str] = field(default_factory=set)

    def identify(self, token: str) -> tuple[int | None, str]:
        """(client id, "") for a valid token; (None, reason) for an unknown or revoked one."""
        given = token.encode()
        found: int | None = None
        for known, client in self.tokens.items():
            if hmac.compare_digest(known.encode(), given):
                found = client
        revoked = False
        for known in self.revoked:
            if hmac.compare_digest(known.encode(), given):
                revoked = True
        if revoked:
            return None, "the token was revoked"
        if found is None:
            return None, "unknown token"
        return found, ""

    @property
    def clients(self) -> set[int]:
        return set(self.tokens.values())


def load_tokens(path: str | Path, n_clients: int) -> TokenTable:
    """Read a token file (YAML or CSV); every mistake is a one-line :class:`HetflError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise HetflError(f"--tokens {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        table = _from_csv(path, text)
    else:
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            raise HetflError(f"{path}: not valid YAML (expected 'tokens: {{TOKEN: CLIENT_ID}}' and 'revoked: [...]')") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), dict):
            raise HetflError(f"{path}: expected a mapping 'tokens: {{TOKEN: CLIENT_ID, ...}}' (and optionally 'revoked: [...]')")
        revoked = raw.get("revoked") or []
        if not isinstance(revoked, list):
            raise HetflError(f"{path}: 'revoked' must be a list of tokens")
        table = TokenTable({str(k): _client_id(path, k, v) for k, v in raw["tokens"].items()}, {str(t) for t in revoked})
        unknown = set(raw) - {"tokens", "revoked"}
        if unknown:
            raise HetflError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected tokens, revoked)")
    for token, client in table.tokens.items():
        if len(token) < MIN_TOKEN_CHARS:
            raise HetflError(f"{path}: the token of client {client} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} (hetfl tokens makes them)")
        if not 0 <= client < n_clients:
            raise HetflError(f"{path}: client id {client} is outside 0..{n_clients - 1} (data.n_clients is {n_clients})")
    ids = list(table.tokens.values())
    twice = sorted({c for c in ids if ids.count(c) > 1})
    if twice:
        raise HetflError(f"{path}: client id {twice[0]} has more than one token")
    return table


def _client_id(path: Path, token: object, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HetflError(f"{path}: the client id of token {str(token)[:6]}... must be an integer, got {value!r}")
    return value


def _from_csv(path: Path, text: str) -> TokenTable:
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "token" not in rows[0] or "client_id" not in rows[0]:
        raise HetflError(f"{path}: expected a CSV header 'token,client_id' (and optionally ',revoked')")
    tokens, revoked = {}, set()
    for line, row in enumerate(rows, start=2):
        try:
            client = int(row["client_id"])
        except (TypeError, ValueError):
            raise HetflError(f"{path}: line {line}: client_id {row['client_id']!r} is not an integer") from None
        token = (row["token"] or "").strip()
        if str(row.get("revoked") or "").strip().lower() in ("yes", "true", "1"):
            revoked.add(token)
        else:
            tokens[token] = client
    return TokenTable(tokens, revoked)


def generate(n_clients: int) -> dict[str, int]:
    """``n_clients`` fresh random tokens (32 bytes each, URL-safe text) for client ids 0..n_clients-1."""
    return {secrets.token_urlsafe(32): client for client in range(n_clients)}


def write_tokens(path: str | Path, n_clients: int) -> dict[str, int]:
    """Write a YAML token file for ``n_clients`` clients (readable by its owner only); return the tokens."""
    path = Path(path)
    tokens = generate(n_clients)
    path.write_text(yaml.safe_dump({"tokens": tokens, "revoked": []}, sort_keys=False))
    path.chmod(0o600)
    return tokens


def read_pem(path: str | None, flag: str) -> bytes | None:
    """The bytes of the PEM file ``path`` given by command-line ``flag`` (None if not given); a missing or
    non-PEM file is a one-line error naming the flag."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise HetflError(f"{flag} {p}: no such file")
    data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise HetflError(f"{flag} {p}: not a PEM file (expected '-----BEGIN ...')")
    return data
