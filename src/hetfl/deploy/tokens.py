"""Credentials: client tokens (which secret a client presents, which client id it is, which tokens are
revoked) and the PEM files of TLS (:func:`read_pem`).

A token file is YAML::

    tokens:                 # token -> client id (0 .. data.n_clients - 1)
      7f3c...e1: 0
      a91b...04: 1
    revoked: [5d2e...9c]    # refused even if listed above
    samples: {0: 359, 1: 360}   # optional: each client's registered sample count, which bounds its weight
    aggregators: {3c9d...77: rack-a}   # optional: aggregator token -> name (hetfl aggregator; YAML only)

or CSV with a header ``token,client_id`` and optional columns ``revoked`` (``yes``/``true``/``1``) and ``samples``.
``hetfl tokens N --out tokens.yaml`` writes one with N random tokens. Tokens are compared in constant
time (:func:`hmac.compare_digest`), every token every time, so timing says nothing about which matched.

The TLS files are checked here too (:func:`check_server_tls`, :func:`check_client_tls`), with Python's own TLS
library, so a wrong key or a file that is no certificate is one line naming it, before gRPC sees them.
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
    samples: dict[int, int] = field(default_factory=dict)  # client id -> registered sample count (bounds its weight)
    aggregators: dict[str, str] = field(default_factory=dict)  # aggregator token -> its name (hetfl aggregator)

    def identify(self, token: str) -> tuple[int | None, str]:
        """(client id, "") for a valid token; (None, reason) for an unknown or revoked one."""
        return self._identify(self.tokens, token)

    def identify_aggregator(self, token: str) -> tuple[str | None, str]:
        """(aggregator name, "") for a valid aggregator token; (None, reason) otherwise. A client's token is no
        aggregator's (the tables are apart, and a token may be in only one)."""
        name, reason = self._identify(self.aggregators, token)
        return name, reason and f"{reason} (as an aggregator's)"

    def _identify(self, table: dict, token: str) -> tuple:
        given = token.encode()
        found = None
        for known, who in table.items():
            if hmac.compare_digest(known.encode(), given):
                found = who
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
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise HetflError(f"{path}: not a text file (expected YAML 'tokens: {{TOKEN: CLIENT_ID}}' or CSV "
                         "'token,client_id'; hetfl tokens N --out FILE writes one)") from None
    if "\x00" in text:
        raise HetflError(f"{path}: holds NUL bytes; not a token file (hetfl tokens N --out FILE writes one)")
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
        samples = raw.get("samples") or {}
        if not isinstance(samples, dict):
            raise HetflError(f"{path}: 'samples' must map client ids to sample counts, e.g. 'samples: {{0: 359}}'")
        for k in samples:
            if isinstance(k, bool) or not isinstance(k, int):
                raise HetflError(f"{path}: samples: {k!r} is not a client id (an integer)")
        table.samples = {k: _count(path, k, v) for k, v in samples.items()}
        aggregators = raw.get("aggregators") or {}
        if not isinstance(aggregators, dict):
            raise HetflError(f"{path}: 'aggregators' must map aggregator tokens to names, e.g. 'aggregators: {{TOKEN: rack-a}}'")
        table.aggregators = {str(k): str(v) for k, v in aggregators.items()}
        unknown = set(raw) - {"tokens", "revoked", "samples", "aggregators"}
        if unknown:
            raise HetflError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected tokens, revoked, samples, aggregators)")
    for token, name in table.aggregators.items():
        if len(token) < MIN_TOKEN_CHARS:
            raise HetflError(f"{path}: the token of aggregator {name} has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
        if token in table.tokens:
            raise HetflError(f"{path}: aggregator {name}'s token is also a client's; give each its own")
    for token, client in table.tokens.items():
        if len(token) < MIN_TOKEN_CHARS:
            raise HetflError(f"{path}: the token of client {client} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} (hetfl tokens makes them)")
        if not 0 <= client < n_clients:
            raise HetflError(f"{path}: client id {client} is outside 0..{n_clients - 1} (data.n_clients is {n_clients})")
    for client in table.samples:
        if not 0 <= client < n_clients:
            raise HetflError(f"{path}: samples: client id {client} is outside 0..{n_clients - 1} (data.n_clients is {n_clients})")
    ids = list(table.tokens.values())
    twice = sorted({c for c in ids if ids.count(c) > 1})
    if twice:
        raise HetflError(f"{path}: client id {twice[0]} has more than one token")
    return table


def _client_id(path: Path, token: object, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HetflError(f"{path}: the client id of token {str(token)[:6]}... must be an integer, got {value!r}")
    return value


def _count(path: Path, client: object, value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HetflError(f"{path}: the sample count of client {client} must be a positive integer, got {value!r}")
    return value


def _from_csv(path: Path, text: str) -> TokenTable:
    try:
        rows = list(csv.DictReader(text.splitlines()))
    except csv.Error as err:
        raise HetflError(f"{path}: not a readable CSV file ({err})") from None
    if not rows or "token" not in rows[0] or "client_id" not in rows[0]:
        raise HetflError(f"{path}: expected a CSV header 'token,client_id' (and optionally ',revoked')")
    tokens, revoked, samples = {}, set(), {}
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
            if str(row.get("samples") or "").strip():
                samples[client] = _count(path, client, str(row["samples"]).strip())
    return TokenTable(tokens, revoked, samples)


def generate(n_clients: int) -> dict[str, int]:
    """``n_clients`` fresh random tokens (32 bytes each, URL-safe text) for client ids 0..n_clients-1."""
    return {secrets.token_urlsafe(32): client for client in range(n_clients)}


def exported_samples(folder: str | Path, n_clients: int) -> dict[int, int]:
    """Each client's sample count from the partition ``hetfl partition --export`` wrote to ``folder``
    (``client_C.npz``: the length of its ``y``); a one-line error naming a file that is missing or unreadable."""
    import numpy as np

    counts = {}
    for client in range(n_clients):
        path = Path(folder) / f"client_{client}.npz"
        if not path.is_file():
            raise HetflError(f"--samples-from {folder}: no {path.name} (written by hetfl partition CONFIG --export "
                             f"{folder} for {n_clients} clients)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                counts[client] = int(len(npz["y"]))
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user mistake
            raise HetflError(f"--samples-from {path}: not a client file of hetfl partition --export "
                             f"({type(err).__name__}: {err})") from None
    return counts


def write_tokens(path: str | Path, n_clients: int, samples: dict[int, int] | None = None,
                 aggregators: int = 0) -> dict[str, int]:
    """Write a YAML token file for ``n_clients`` clients (readable by its owner only), with each client's
    registered sample count if ``samples`` gives them (they bound a client's weight), and tokens for ``aggregators``
    aggregators named agg-0, agg-1, ... (``hetfl aggregator``); return the clients' tokens."""
    path = Path(path)
    tokens = generate(n_clients)
    content: dict = {"tokens": tokens, "revoked": []}
    if samples:
        content["samples"] = dict(sorted(samples.items()))
    if aggregators:
        content["aggregators"] = {token: f"agg-{i}" for token, i in generate(aggregators).items()}
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    path.chmod(0o600)
    return tokens


def read_token_file(path: str | Path, flag: str = "--token-file") -> str:
    """The token alone on the one line of the file ``path`` (given by ``flag``); a mistake is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise HetflError(f"{flag} {path}: no such file")
    try:
        token = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise HetflError(f"{flag} {path}: not a text file (expected the token alone on one line)") from None
    if not token or len(token.split()) != 1:
        raise HetflError(f"{flag} {path}: expected the token alone on one line")
    return token


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


def check_server_tls(cert: str | None, key: str | None, client_ca: str | None = None) -> None:
    """Refuse, in one line naming the file, a certificate that is not one, a key that is not the certificate's
    (or is encrypted), or a client CA that is no certificate: what gRPC would report as not being able to listen."""
    if cert is not None and key is not None:
        _check_pair(cert, key, "--tls-cert", "--tls-key")
    if client_ca is not None:
        _certificates(client_ca, "--tls-client-ca")


def check_client_tls(ca: str | None, cert: str | None = None, key: str | None = None) -> None:
    """As :func:`check_server_tls`, for a client's ``--tls-ca`` and its own ``--tls-cert/--tls-key``."""
    if ca is not None:
        _certificates(ca, "--tls-ca")
    if cert is not None and key is not None:
        _check_pair(cert, key, "--tls-cert", "--tls-key")


def _certificates(path: str, flag: str) -> list:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError:
        certs = []
    if not certs:
        raise HetflError(f"{flag} {path}: holds no readable PEM certificate ('-----BEGIN CERTIFICATE-----')")
    return certs


def _check_pair(cert: str, key: str, cert_flag: str, key_flag: str) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    leaf = _certificates(cert, cert_flag)[0]
    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except TypeError:
        raise HetflError(f"{key_flag} {key}: the private key is encrypted; gRPC needs it unencrypted "
                         "(openssl pkey -in KEY -out KEY.plain)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise HetflError(f"{key_flag} {key}: holds no readable PEM private key ('-----BEGIN PRIVATE KEY-----')") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise HetflError(f"{key_flag} {key}: not the private key of the certificate {cert_flag} {cert}")


def check_address(address: str, flag: str = "--address") -> str:
    """``HOST:PORT`` with a port in 0..65535 (0: a free one), or ``unix:PATH``; else a one-line error."""
    if address.startswith("unix:"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise HetflError(f"{flag} {address}: expected HOST:PORT with a port in 0..65535 (0: any free port), "
                         "e.g. 0.0.0.0:50051")
    return address
