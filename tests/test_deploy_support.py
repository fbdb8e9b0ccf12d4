"""Starting real ``hetfl server`` and ``hetfl client`` processes on loopback, for the deployment tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

HETFL = [sys.executable, "-m", "hetfl.cli"]
# ``hetfl client`` as the deployment tests start it: the same command, with its reconnection backoff capped at
# RETRY_CAP_S instead of 30 s. A client started before its server listens, or waiting out a server's restart,
# otherwise sleeps up to 8-30 s after the server is back (on a loaded 2-core machine the server takes seconds to
# start): tens of seconds of a test spent asleep. The backoff itself is tested in test_deploy_units.py.
RETRY_CAP_S = 2.0
HETFL_CLIENT = [sys.executable, "-c", "import functools, sys; from hetfl.deploy import client; "
                f"client.Backoff = functools.partial(client.Backoff, cap={RETRY_CAP_S}); "
                "from hetfl.cli import main; sys.exit(main())", "client"]
N_CLIENTS = 5
RUN_TIMEOUT_S = 240  # generous: the machine is shared; nothing here should take more than a fraction of it

# digits, 5 IID clients, all of them in every FedAvg round: 0.85 accuracy within about 6 rounds
BASE = {
    "name": "deploy-test",
    "seed": 0,
    "rounds": 10,
    "data": {"dataset": "digits", "n_clients": N_CLIENTS, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"lr": 0.05, "batch_size": 16, "local_steps": 20},
    "strategy": {"name": "fedavg", "clients_per_round": N_CLIENTS},
    "evaluation": {"target_accuracy": 0.85},
    "deploy": {"heartbeat_timeout_s": 8, "poll_s": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, name: str = "config.yaml", **changes) -> Path:
    """BASE with ``changes`` (``strategy__name="fedcompass"`` sets strategy.name) written to ``folder/name``."""
    raw = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        node, parts = raw, key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class Deployment:
    """One server and its clients; every process is killed at the end, whatever happened."""

    env: object  # the session's DeployEnv
    out: Path
    port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    clients: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_server(self, config: Path, *extra: str) -> subprocess.Popen:
        log = self.out.parent / f"{self.out.name}-server-{len(self.logs)}.log"
        self.logs.append(log)
        self.server = subprocess.Popen(
            [*HETFL, "server", str(config), "--address", self.address, "--out", str(self.out),
             "--tokens", str(self.env.tokens), *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT,
        )
        return self.server

    def start_client(self, client: int, *extra: str, token_file: Path | None = None, data: Path | None = None,
                     cwd: Path | None = None) -> subprocess.Popen:
        log = self.out.parent / f"{self.out.name}-client-{client}-{len(self.logs)}.log"
        self.logs.append(log)
        proc = subprocess.Popen(
            [*HETFL_CLIENT, "--server", self.address, "--token-file", str(token_file or self.env.token_files[client]),
             "--data", str(data or self.env.parts / f"client_{client}.npz"), *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd,
        )
        self.clients.append(proc)
        return proc

    def start_clients(self, *extra: str, clients: range | list[int] = range(N_CLIENTS), per_client: dict | None = None) -> None:
        for c in clients:
            self.start_client(c, *extra, *(per_client or {}).get(c, ()))

    def wait_server(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.server.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not finish in {timeout} s; its log:\n{self.server_log()}") from None

    def wait_listening(self, timeout: float = 120) -> None:
        wait_for(lambda: "listening on" in self.server_log() or self.server.poll() is not None, timeout, "the server")
        assert self.server.poll() is None, self.server_log()

    def server_log(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if "-server-" in p.name)

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def close(self) -> None:
        procs = [p for p in [self.server, *self.clients] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return finish(start_cli(*args), timeout)


def start_cli(*args: str) -> subprocess.Popen:
    """``hetfl *args`` started, its output captured: several at once cost one process start-up, not several."""
    return subprocess.Popen([*HETFL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_cli` process: what ``subprocess.run`` returns (killed past ``timeout``)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@dataclass
class DeployEnv:
    """What every deployment test shares: the exported partition, the token file and one token file per client."""

    root: Path
    config: Path
    parts: Path
    tokens: Path
    token_files: list[Path]
    revoked_token: str
    samples: dict[int, int] = field(default_factory=dict)  # registered in the token file


def make_env(root: Path, n_clients: int = N_CLIENTS) -> DeployEnv:
    from hetfl.config import load_config
    from hetfl.deploy.export import export_partitions
    from hetfl.deploy.tokens import generate

    config = write_config(root, **({} if n_clients == N_CLIENTS else {"data__n_clients": n_clients}))
    parts = root / "parts"
    export_partitions(load_config(config), parts)
    tokens = generate(n_clients)
    revoked = "revoked-" + "x" * 24
    samples = {}
    for c in range(n_clients):  # each client's registered sample count (it bounds its weight): its exported file's
        with np.load(parts / f"client_{c}.npz") as npz:
            samples[c] = len(npz["y"])
    (root / "tokens.yaml").write_text(yaml.safe_dump({"tokens": tokens, "revoked": [revoked], "samples": samples}))
    files = []
    for token, client in sorted(tokens.items(), key=lambda kv: kv[1]):
        path = root / f"token_{client}"
        path.write_text(token + "\n")
        files.append(path)
    return DeployEnv(root, config, parts, root / "tokens.yaml", files, revoked, samples)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate it signed for localhost and 127.0.0.1, and a client certificate it
    signed (PEM files: ca, cert, key, client_cert, client_key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hetfl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hetfl client")]))
              .issuer_name(ca_name).public_key(client_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
              .sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    files["client_cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    files["client_key"].write_bytes(client_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


# ---------------------------------------------------------------------------- fixtures the deployment test files share
# A test file imports them (``from test_deploy_support import deployment, env``): each file gets its own env.
@pytest.fixture(scope="module")
def env(request, tmp_path_factory) -> DeployEnv:
    """The exported partition and tokens of the shared config (five clients), once per test file."""
    return make_env(tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_").replace("_", "-")))


@pytest.fixture
def deployment(env, tmp_path):
    """A Deployment in the test's folder; its processes are killed at the end, whatever happened."""
    dep = Deployment(env, tmp_path / "run")
    yield dep
    dep.close()
