"""Soak: a real ``hetfl server`` and 20 ``hetfl client`` processes on loopback for five minutes, under faults.

    .venv/bin/python benchmarks/soak.py                      # 300 s, 20 clients (docs/deployment.md, "Soak")
    .venv/bin/python benchmarks/soak.py --seconds 90 --clients 8 --out /tmp/soak   # a quick look

What happens, on the wall clock (fractions of ``--seconds``):

- 0.00-0.20  clean: every client up; the clean aggregation rate is measured over 0.05-0.20;
- from 0.20  a random client is killed (SIGKILL) every ``--kill-every`` seconds and started again 3 s later
  (a crash and a restart, with the same token: it must get back in);
- at 0.40 and 0.65  the server is killed (SIGKILL) and started again at once on the same ``--out`` (it resumes
  from its checkpoint);
- 0.80-0.95  100 SendUpdate streams without a token that never send a message, opened again whenever the server
  ends one (an attacker); the rate over this window is compared with the clean rate.

At the end the server is interrupted (SIGINT: it checkpoints and writes its summary) and every process is killed.

What it reports (and writes to ``OUT/soak.json``):

- **aggregations lost**: for each server kill, the last aggregation ``metrics.jsonl`` held when it died minus the
  aggregation its successor resumed from (the ``resumed from ... at aggregation V`` line), and whether
  ``metrics.jsonl`` holds every round once in order. Must be 0 and true.
- **updates**: acknowledged as accepted by the server (the clients' ``update accepted`` lines) and aggregated
  (``summary.json``'s ``updates``); the difference is updates accepted into a round that a server kill voided
  (their tasks are sent again after the restart) or still held at the end.
- **round rate** under the attack against the clean rate (aggregations per minute), and accuracy.

A benchmark, not a test: nothing is asserted; the numbers are printed and written, and docs/deployment.md quotes
them with this command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

HETFL = [sys.executable, "-m", "hetfl.cli"]
ROOT = Path(__file__).resolve().parents[1]

ATTACKER = textwrap.dedent("""
    import os, sys, threading, time
    import grpc
    from hetfl.deploy import federation_pb2 as pb
    from hetfl.deploy import federation_pb2_grpc as pb_grpc

    address, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    stubs = [pb_grpc.FederationStub(grpc.insecure_channel(address)) for _ in range(4)]
    stop = threading.Event()
    opened = [0]

    def open_stream(i):
        if stop.is_set():
            return
        def requests():
            if i % 2:
                yield pb.Chunk(update=pb.UpdateHeader(session="made-up", task_id=0))
            stop.wait(seconds + 30)
        opened[0] += 1
        call = stubs[i % 4].SendUpdate.future(requests(), timeout=seconds + 30)
        call.add_done_callback(lambda _f: stop.is_set() or threading.Timer(1.0, open_stream, (i,)).start())

    for i in range(n):
        open_stream(i)
    time.sleep(seconds)
    stop.set()
    print(opened[0], flush=True)
    os._exit(0)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(n_clients: int) -> dict:
    """digits, an MLP, FedAvg with half the clients a round: many short rounds, so that rates are measurable."""
    return {
        "name": "soak", "seed": 0, "rounds": 1_000_000,
        "data": {"dataset": "digits", "n_clients": n_clients, "partition": {"kind": "dirichlet", "alpha": 1.0}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"lr": 0.05, "batch_size": 16, "local_steps": 20},
        "strategy": {"name": "fedavg", "clients_per_round": max(2, n_clients // 2)},
        "deploy": {"heartbeat_timeout_s": 10, "poll_s": 2, "min_clients": max(2, n_clients // 2)},
    }


class Soak:
    def __init__(self, folder: Path, n_clients: int, seed: int) -> None:
        self.folder, self.n = folder, n_clients
        self.rng = random.Random(seed)
        self.out = folder / "run"
        self.address = f"127.0.0.1:{free_port()}"
        self.config = folder / "soak.yaml"
        self.config.write_text(yaml.safe_dump(config(n_clients), sort_keys=False))
        self.logs: list[Path] = []
        self.server: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}
        self.kills: list[dict] = []
        for args in (["partition", str(self.config), "--export", str(folder / "parts")],
                     ["tokens", str(n_clients), "--out", str(folder / "tokens.yaml")]):
            subprocess.run([*HETFL, *args], check=True, capture_output=True)
        tokens = yaml.safe_load((folder / "tokens.yaml").read_text())["tokens"]
        for token, client in tokens.items():
            (folder / f"token_{client}").write_text(token + "\n")

    def _log(self, name: str) -> Path:
        path = self.folder / f"{name}-{len(self.logs)}.log"
        self.logs.append(path)
        return path

    def start_server(self) -> None:
        self.server = subprocess.Popen(
            [*HETFL, "server", str(self.config), "--address", self.address, "--out", str(self.out),
             "--tokens", str(self.folder / "tokens.yaml")],
            stdout=self._log("server").open("w"), stderr=subprocess.STDOUT)

    def start_client(self, c: int) -> None:
        self.clients[c] = subprocess.Popen(
            [*HETFL, "client", "--server", self.address, "--token-file", str(self.folder / f"token_{c}"),
             "--data", str(self.folder / "parts" / f"client_{c}.npz"), "--give-up-after", "120"],
            stdout=self._log(f"client{c}").open("w"), stderr=subprocess.STDOUT)

    def rounds(self) -> int:
        path = self.out / "metrics.jsonl"
        return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0

    def kill_server(self, at: float) -> None:
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(30)
        self.kills.append({"at_s": round(at, 1), "last_logged": self.rounds()})
        self.start_server()

    def server_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.name.startswith("server-"))

    def client_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.name.startswith("client"))

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGINT)  # checkpoint and summary
            try:
                self.server.wait(60)
            except subprocess.TimeoutExpired:
                self.server.kill()
        for proc in self.clients.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.clients.values():
            proc.wait(30)


def rate(soak: Soak, seconds: float) -> float:
    """Aggregations per minute over the next ``seconds``."""
    start, r0 = time.monotonic(), soak.rounds()
    time.sleep(seconds)
    return 60.0 * (soak.rounds() - r0) / (time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between random client kills")
    parser.add_argument("--streams", type=int, default=100, help="hanging unauthenticated streams in the attack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the run and the logs (default: a temporary one, kept)")
    args = parser.parse_args(argv)
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hetfl-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    T = args.seconds
    soak = Soak(folder, args.clients, args.seed)
    t0 = time.monotonic()

    def now() -> float:
        return time.monotonic() - t0

    def until(t: float) -> None:
        time.sleep(max(0.0, t - now()))

    result: dict = {"seconds": T, "clients": args.clients, "folder": str(folder)}
    try:
        soak.start_server()
        for c in range(args.clients):
            soak.start_client(c)
        started = time.monotonic()  # the clock starts once the federation is up: 20 processes importing torch
        while soak.rounds() < 3 and time.monotonic() - started < 300:
            time.sleep(0.5)
        result["startup_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        until(0.05 * T)
        result["clean_per_min"] = rate(soak, 0.15 * T)
        client_kills = 0
        server_kills = [0.40 * T, 0.65 * T]
        next_kill = 0.20 * T
        while now() < 0.80 * T:
            if server_kills and now() >= server_kills[0]:
                soak.kill_server(server_kills.pop(0))
            if now() >= next_kill:
                c = soak.rng.randrange(args.clients)
                soak.clients[c].send_signal(signal.SIGKILL)
                soak.clients[c].wait(30)
                client_kills += 1
                time.sleep(3.0)
                soak.start_client(c)
                next_kill = now() + args.kill_every
            time.sleep(0.2)
        result["client_kills"] = client_kills
        attack = subprocess.Popen([sys.executable, "-c", ATTACKER, soak.address, str(args.streams), str(0.15 * T)],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        result["attacked_per_min"] = rate(soak, 0.14 * T)
        out, _ = attack.communicate(timeout=0.15 * T + 60)
        result["attack_streams_opened"] = int(out.strip() or 0)
        until(T)
    finally:
        soak.close()
    log = soak.server_log()
    resumed = [int(v) for v in re.findall(r"resumed from .* at aggregation (\d+)", log)]
    for kill, version in zip(soak.kills, resumed):
        kill["resumed_at"] = version
        kill["lost"] = max(0, kill["last_logged"] - version)
    rounds = [json.loads(line)["round"] for line in (soak.out / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((soak.out / "summary.json").read_text())
    clients = soak.client_log()
    result.update(
        server_kills=soak.kills,
        aggregations_lost=sum(k.get("lost", 0) for k in soak.kills) if len(resumed) == len(soak.kills) else None,
        metrics_in_order=rounds == list(range(len(rounds))),
        aggregations=summary["rounds"],
        updates_acknowledged=clients.count("update accepted"),
        updates_rejected_ack=clients.count("update rejected by the server"),
        updates_aggregated=summary["updates"],
        failed_tasks=summary["failed_tasks"],
        final_accuracy=summary["final_accuracy"],
        tracebacks=log.count("Traceback") + clients.count("Traceback"),
    )
    result["attacked_over_clean"] = (result["attacked_per_min"] / result["clean_per_min"]
                                     if result["clean_per_min"] else None)
    (folder / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
