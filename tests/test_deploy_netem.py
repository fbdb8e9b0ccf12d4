"""FedCompass over a real slow link: two clients in network namespaces behind a shaped veth pair.

Each slow client runs in its own network namespace, joined to the host by a veth pair whose both ends are
shaped with ``tc``: ``netem delay 100ms rate 2mbit`` where the kernel has netem, else ``tbf rate 2mbit``
(a bandwidth limit without added delay: still a real slow link). The three other clients use loopback.
FedCompass measures each client's seconds per local step, transfers included, so the slow clients must
be seen as slower: a speed estimate several times the fast clients', and fewer updates aggregated
or fewer local steps per task. Needs root and network namespaces; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest
import torch

from test_deploy_support import N_CLIENTS, Deployment, make_env, write_config

pytestmark = pytest.mark.serial  # timing-sensitive or a Ray cluster: run alone (the Makefile's test target)

SLOW = (3, 4)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _tc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", *args], capture_output=True, text=True)


@pytest.fixture
def slow_links():
    """Two namespaces ``<tag>-3``/``<tag>-4`` with shaped veth links; yields (namespace, host address, shaping) each."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root; run as root to shape real links with tc")
    tag = "hf" + uuid.uuid4().hex[:6]
    made: list[str] = []
    links = {}
    try:
        for i, client in enumerate(SLOW):
            ns, host, inner = f"{tag}-{client}", f"{tag}h{client}", f"{tag}n{client}"
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace here ('ip netns add' said: {r.stderr.strip()})")
            made.append(ns)
            subnet = f"10.231.{100 + i}"
            for cmd in (["link", "add", host, "type", "veth", "peer", "name", inner],
                        ["link", "set", inner, "netns", ns],
                        ["addr", "add", f"{subnet}.1/24", "dev", host], ["link", "set", host, "up"],
                        ["-n", ns, "addr", "add", f"{subnet}.2/24", "dev", inner], ["-n", ns, "link", "set", inner, "up"],
                        ["-n", ns, "link", "set", "lo", "up"]):
                r = _ip(*cmd)
                if r.returncode != 0:
                    pytest.skip(f"cannot set up a veth pair here ('ip {' '.join(cmd)}' said: {r.stderr.strip()})")
            shaping = None
            for qdisc in (["netem", "delay", "100ms", "rate", "2mbit"], ["tbf", "rate", "2mbit", "burst", "16kb", "latency", "1s"]):
                outside = _tc("qdisc", "add", "dev", host, "root", *qdisc)
                inside = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, "root", *qdisc],
                                        capture_output=True, text=True)
                if outside.returncode == 0 and inside.returncode == 0:
                    shaping = " ".join(qdisc)
                    break
                _tc("qdisc", "del", "dev", host, "root")
            if shaping is None:
                pytest.skip(f"tc cannot shape links here (netem and tbf both refused: {outside.stderr.strip()})")
            links[client] = (ns, f"{subnet}.1", shaping)
        yield links
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # deletes the namespace's end of the veth pair, and so the pair


def test_fedcompass_sees_clients_behind_slow_links_as_slow(slow_links, tmp_path):
    (tmp_path / "env").mkdir()
    env = make_env(tmp_path / "env")
    # a larger model (38 kB a transfer) so that the 2 Mbit/s links, not the CPU, set the slow clients' pace
    config = write_config(tmp_path, strategy__name="fedcompass", rounds=30, model__hidden=[128])
    dep = Deployment(env, tmp_path / "run")
    try:
        dep.start_server(config, "--address", f"0.0.0.0:{dep.port}")
        for client in range(N_CLIENTS):
            if client in slow_links:
                ns, host, _ = slow_links[client]
                log = tmp_path / f"client-{client}.log"
                dep.logs.append(log)
                dep.clients.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, *_client_argv(dep, env, client, f"{host}:{dep.port}")],
                    stdout=log.open("w"), stderr=subprocess.STDOUT))
            else:
                dep.start_client(client)
        assert dep.wait_server() == 0, dep.server_log()
        speed = torch.load(dep.out / "checkpoint.pt", weights_only=False)["state"].strategy.speed  # s per step
        fast = [speed[c] for c in range(N_CLIENTS) if c not in slow_links]
        slow = [speed[c] for c in slow_links]
        shaping = next(iter(slow_links.values()))[2]
        assert min(slow) > 3 * max(fast), (shaping, speed)
        summary = dep.summary()
        steps = {c: _steps(tmp_path / f"client-{c}.log") if c in slow_links else None for c in range(N_CLIENTS)}
        slow_steps = [s for c in slow_links for s in steps[c]]
        fewer_updates = max(summary["participation"][c] for c in slow_links) < min(
            summary["participation"][c] for c in range(N_CLIENTS) if c not in slow_links)
        assert fewer_updates or (slow_steps and sum(slow_steps) / len(slow_steps) < 20), (summary["participation"], steps)
        assert summary["final_accuracy"] >= 0.85
    finally:
        dep.close()


def _client_argv(dep: Deployment, env, client: int, server: str) -> list[str]:
    from test_deploy_support import HETFL_CLIENT

    return [*HETFL_CLIENT, "--server", server, "--token-file", str(env.token_files[client]),
            "--data", str(env.parts / f"client_{client}.npz")]


def _steps(log) -> list[int]:
    """The local steps of every task a client's log reports."""
    return [int(m) for m in re.findall(r", (\d+) steps, loss", log.read_text())]
