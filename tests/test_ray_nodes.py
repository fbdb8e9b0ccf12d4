"""Ray on more than one node: a head and two worker nodes, each a separate ``ray start`` (``tests/ray_cluster.py``).

Where the machine allows it (root with CAP_NET_ADMIN: a container started as root usually is) every worker node
is in a network namespace of its own with its own address on a bridge, and the head in this one; elsewhere all
three are on loopback, still separate raylets, object stores and workers. The head has no CPUs, so every client
half runs on a worker node; a custom resource per node tells them apart. A federation with ``backend.address``
set to the head gives the in-process run bit for bit (``training.vectorize: off``; batched, within 1e-5), and so
does one in which a worker node is killed (SIGKILL to all its processes) in the middle: its tasks are retried on
the other node.

Starting the cluster takes most of the time (about 50 s on a busy 2-core machine); every wait is bounded, and
every node is killed at the end whatever happens.

The checks run in a Python process of their own (this file run as a script, by the one test below): Ray reads its
authentication mode once per process, so a driver of this cluster (no token, see ``tests/ray_cluster.py``) and
the local Rays the other serial tests start (a token when the home folder has one) cannot share a process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetfl.config import validate
from hetfl.engine.run import build_federation
from ray_cluster import LocalCluster, driver_env

pytestmark = pytest.mark.serial  # a Ray cluster: run alone (the Makefile's test target)

ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install hetfl[ray])")

CONFIG = {
    "seed": 3,
    "threads": 1,
    "data": {"dataset": "digits", "n_clients": 8, "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"lr": 0.05, "batch_size": 16, "local_steps": 30, "vectorize": "off"},
    "strategy": {"name": "fedavg", "clients_per_round": 6},
    "rounds": 5,
}


def test_two_worker_nodes_equal_the_in_process_run_also_when_one_is_lost():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        child = subprocess.run([sys.executable, __file__], env=env, cwd=Path(__file__).parent.parent,
                               capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the checks on a Ray cluster did not finish in 900 s: {(err.stdout or b'')[-3000:]!r}")
    assert child.returncode == 0, f"{child.stdout[-6000:]}\n{child.stderr[-6000:]}"
    said = [line for line in child.stdout.splitlines() if line.startswith("ok: ")]  # Ray prints to stdout too
    assert said == ["ok: equal on two worker nodes", "ok: equal after losing one"]


def main() -> None:
    """The checks, on one cluster (run by the test above in a process of its own)."""
    if ray.is_initialized():
        raise SystemExit("Ray is already initialised in this process")
    with LocalCluster(workers=2, cpus=1) as cluster, driver_env(cluster):
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        try:
            cluster.wait_for_nodes(ray)
            print(f"cluster up: {cluster.network}, head {cluster.address}", flush=True)
            check_two_worker_nodes_equal_the_in_process_run(cluster)
            print("ok: equal on two worker nodes", flush=True)
            check_losing_a_worker_node_equals_the_in_process_run(cluster)
            print("ok: equal after losing one", flush=True)
        finally:
            ray.shutdown()


def run(changes: dict, before_result=None):
    """The federation of CONFIG with ``changes`` (``{"backend": ...}``, ``{"vectorize": ...}``) for its rounds;
    ``before_result(sim)`` is called at every arrival, before the backend is asked for the task's result."""
    raw = {**CONFIG, "training": {**CONFIG["training"]}}
    raw["backend"] = changes.get("backend", {"name": "inprocess"})
    raw["training"]["vectorize"] = changes.get("vectorize", "off")
    cfg = validate(raw)
    fed = build_federation(cfg)

    def stop(sim):
        if sim.version >= cfg.rounds:
            sim.stop("rounds")

    sim = fed.simulator(on_commit=stop)
    if before_result is not None:
        result = sim.backend.result

        def watched(task, data, state):
            before_result(sim)
            return result(task, data, state)

        sim.backend.result = watched
    sim.proceed()
    try:
        while sim.step():
            pass
    finally:
        sim.close()
    return sim


def same_run(a, b) -> None:
    assert torch.equal(a.params, b.params)
    assert (a.now, a.version, a.counters.arrived, a.counters.cancelled) == (b.now, b.version, b.counters.arrived,
                                                                            b.counters.cancelled)


def check_two_worker_nodes_equal_the_in_process_run(cluster: LocalCluster) -> None:
    local = run({})
    remote = run({"backend": {"name": "ray", "address": cluster.address}})
    same_run(local, remote)
    nodes = cluster.node_resources(ray)
    assert set(remote.backend.nodes) == set(nodes), "both worker nodes trained tasks (the head has no CPUs)"
    assert sum(remote.backend.nodes.values()) == remote.counters.arrived
    # batched on the workers (one batch per worker a round): the in-process batched run within rounding
    batched = run({"backend": {"name": "ray", "address": cluster.address}, "vectorize": "on"})
    assert batched.backend.batches and max(batched.backend.batches) > 1
    assert torch.allclose(batched.params, run({"vectorize": "on"}).params, atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched.params, local.params, atol=1e-5, rtol=1e-4)


def check_losing_a_worker_node_equals_the_in_process_run(cluster: LocalCluster) -> None:
    killed = {}

    def kill_node_0(sim):
        if sim.version == 2 and not killed:  # the first arrival of round 3: its tasks are on both nodes
            refs = [entry[1] for entry in sim.backend._futures.values()]
            killed["unfinished"] = len(ray.wait(refs, num_returns=len(refs), timeout=0)[1])
            cluster.kill(0)

    local = run({})
    remote = run({"backend": {"name": "ray", "address": cluster.address}}, before_result=kill_node_0)
    same_run(local, remote)
    assert killed["unfinished"] > 0, "tasks were still to be trained when the node died"
    cluster.wait_for_nodes(ray, alive=1)  # the head notices a dead node after its health checks fail
    alive = cluster.node_resources(ray)
    assert sorted(alive.values()) == ["hetfl_node_1"]
    assert sum(remote.backend.nodes.values()) == remote.counters.arrived
    survivor = remote.backend.nodes[next(iter(alive))]
    per_round = CONFIG["strategy"]["clients_per_round"]
    assert survivor >= remote.counters.arrived - 3 * per_round, "rounds 4 and 5 trained on the surviving node"


if __name__ == "__main__":
    main()
