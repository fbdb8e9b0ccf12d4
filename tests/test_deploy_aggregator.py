"""``hetfl aggregator``: leaf aggregators between clients and the server (hierarchical aggregation, LIFL).

A hand-worked pre-aggregation case, then real processes on loopback: a server, two aggregators and four clients
running FedAvg give the simulator's model (as a flat deployment does, tests/test_deploy.py) while the server receives
fewer update messages and bytes; aggregator credentials; a forged aggregate; an aggregator killed mid-run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import grpc
import pytest
import torch
import yaml

from hetfl.config import load_config
from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy import federation_pb2_grpc as pb_grpc
from hetfl.deploy import gate, wire
from hetfl.deploy.aggregator import PreAggregate
from hetfl.engine.run import run_experiment
from hetfl.strategies.base import Task, Update
from hetfl.strategies.checks import secure_updates
from test_deploy_support import HETFL, Deployment, free_port, make_env, run_cli, wait_for, write_config

N = 4  # clients: two per aggregator
ROUNDS = 4


def _member(task_id: int, client: int, n: int) -> pb.Member:
    return pb.Member(task_id=task_id, client_id=client, n_samples=n, steps=1, loss=0.5)


def test_pre_aggregation_by_hand():
    """2 leaves x 2 clients, start model w = (0, 0). Leaf A: client 0 (1 sample) sends (1, 2), client 1 (3 samples)
    (5, 6): running sums (1, 2) / 1, then (1 + 15, 2 + 18) = (16, 20) / 4, mean (4, 5). Leaf B: client 2 (2 samples)
    (2, 0), client 3 (2 samples) (0, 4): sum (4, 8) / 4, mean (1, 2). The flat weighted mean is
    (1 + 15 + 4 + 0, 2 + 18 + 0 + 8) / 8 = (2.5, 3.5); the strategy is handed, for each client, the leaf's mean with
    the client's own weight, whose weighted mean is (4 * (4, 5) + 4 * (1, 2)) / 8 = (2.5, 3.5): the same."""
    w = torch.zeros(2)
    sent = {0: (1, [1.0, 2.0]), 1: (3, [5.0, 6.0]), 2: (2, [2.0, 0.0]), 3: (2, [0.0, 4.0])}
    leaves = {"A": PreAggregate(), "B": PreAggregate()}
    for client, (n, params) in sent.items():
        leaf = leaves["A" if client < 2 else "B"]
        group = leaf.add(7, torch.tensor(params), n, _member(client, client, n))
        if client == 0:
            assert group.total.tolist() == [1.0, 2.0] and group.weight == 1
    a, b = leaves["A"].take(7), leaves["B"].take(7)
    assert a.total.tolist() == [16.0, 20.0] and a.weight == 4 and a.mean().tolist() == [4.0, 5.0]
    assert b.total.tolist() == [4.0, 8.0] and b.weight == 4 and b.mean().tolist() == [1.0, 2.0]
    assert a.total.dtype == torch.float64 and a.mean().dtype == torch.float32
    assert leaves["A"].take(7) is None  # taken once

    # what the server hands the strategy: per member, secure_updates of its group (the group's mean, its own weight)
    handed = []
    for group in (a, b):
        updates = [Update(task=Task(m.task_id, m.client_id, 7, w, 1, 0.0), params=group.mean(), n_samples=m.n_samples,
                          steps=1, loss=0.5, arrived_at=0.0) for m in group.members]
        handed += secure_updates(updates)
    assert [u.params.tolist() for u in handed] == [[4.0, 5.0]] * 2 + [[1.0, 2.0]] * 2
    assert [u.n_samples for u in handed] == [1, 3, 2, 2]
    weights = torch.tensor([float(u.n_samples) for u in handed])
    mean = (weights @ torch.stack([u.params for u in handed])) / weights.sum()
    assert mean.tolist() == [2.5, 3.5]
    flat = sum(n * torch.tensor(p) for n, p in sent.values()) / 8
    assert flat.tolist() == [2.5, 3.5]


def test_the_aggregator_applies_the_servers_norm_bound_to_each_update():
    """The server sees only a group's mean, so the aggregator bounds each update by the server's deploy.update_norm
    (sent in the config at a join): fixed, max_update_norm 1; adaptive, 10 x the median score after 3 updates."""
    from hetfl.deploy.aggregator import Aggregator, AggregatorOptions

    agg = Aggregator(AggregatorOptions(parent=f"127.0.0.1:{free_port()}", address="127.0.0.1:0", token="t" * 32))
    try:
        w = torch.zeros(4)
        agg.norm_bound = agg.bound_of({"max_update_norm": 1.0})
        assert agg.bounded(w + 0.4, w, 5) is None  # norm 0.8
        assert agg.bounded(w + 0.6, w, 5) == "update norm 1.2 > bound 1.0"
        agg.norm_bound, agg.norm_history = agg.bound_of({}), {}  # the default: adaptive, factor 10, warm-up 3
        for _ in range(3):
            assert agg.bounded(w + 0.5, w, 4) is None  # norm 1, score 1 / sqrt(4) = 0.5: the history's median
        assert agg.bounded(w + 4.9, w, 4) is None  # score 4.9 <= 10 x 0.5
        assert agg.bounded(w + 255.0, w, 4).startswith("update norm 510 (255 per sqrt(step), 4 steps) > 5,")
    finally:
        agg.channel.close()
        agg.gate.close()


def test_aggregator_tokens_in_the_token_file(tmp_path):
    from hetfl.deploy.tokens import load_tokens, write_tokens
    from hetfl.errors import HetflError

    tokens = write_tokens(tmp_path / "t.yaml", 2, aggregators=2)
    table = load_tokens(tmp_path / "t.yaml", 2)
    assert sorted(table.aggregators.values()) == ["agg-0", "agg-1"]
    agg_token = next(iter(table.aggregators))
    client_token = next(iter(tokens))
    assert table.identify_aggregator(agg_token)[0] in ("agg-0", "agg-1")
    assert table.identify_aggregator(client_token) == (None, "unknown token (as an aggregator's)")
    assert table.identify(agg_token) == (None, "unknown token")
    for aggregators, message in (({client_token: "x"}, "also a client's"), ({"short": "x"}, "at least 16"),
                                 (["x"], "must map aggregator tokens")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"tokens": tokens, "aggregators": aggregators}))
        with pytest.raises(HetflError, match=message):
            load_tokens(tmp_path / "bad.yaml", 2)


# ---------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def agg_env(tmp_path_factory):
    """Four clients' partition and tokens, plus two aggregator tokens (rack-a, rack-b) in the server's token file."""
    root = tmp_path_factory.mktemp("deploy-aggregator")
    env = make_env(root, n_clients=N)
    table = yaml.safe_load(env.tokens.read_text())
    names = {"a" * 32: "rack-a", "b" * 32: "rack-b"}
    table["aggregators"] = names
    env.tokens.write_text(yaml.safe_dump(table))
    for token, name in names.items():
        (root / f"token_{name}").write_text(token + "\n")
    env.config = write_config(root, data__n_clients=N, strategy__clients_per_round=N, rounds=ROUNDS)
    return env


class Hierarchy(Deployment):
    """A Deployment with aggregators; its clients join through them."""

    aggregators: dict[str, tuple[subprocess.Popen, int]]

    def start_aggregator(self, name: str, *extra: str) -> int:
        port = free_port()
        log = self.out.parent / f"{self.out.name}-aggregator-{name}.log"
        self.logs.append(log)
        proc = subprocess.Popen(
            [*HETFL, "aggregator", "--parent", self.address, "--address", f"127.0.0.1:{port}",
             "--token-file", str(self.env.root / f"token_{name}"), "--give-up-after", "60", *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.aggregators = {**getattr(self, "aggregators", {}), name: (proc, port)}
        self.clients.append(proc)  # killed at the end with the others
        return port

    def start_client_via(self, client: int, port: int) -> subprocess.Popen:
        log = self.out.parent / f"{self.out.name}-client-{client}.log"
        self.logs.append(log)
        proc = subprocess.Popen(
            [*HETFL, "client", "--server", f"127.0.0.1:{port}", "--token-file", str(self.env.token_files[client]),
             "--data", str(self.env.parts / f"client_{client}.npz"), "--give-up-after", "20"],
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.clients.append(proc)
        return proc

    def log_of(self, what: str) -> str:
        return "\n".join(p.read_text() for p in self.logs if what in p.name)


@pytest.fixture
def hierarchy(agg_env, tmp_path):
    dep = Hierarchy(agg_env, tmp_path / "run")
    yield dep
    dep.close()


def _start(dep: Hierarchy, config, *agg_extra: str) -> dict[str, int]:
    dep.start_server(config)
    dep.wait_listening()
    ports = {name: dep.start_aggregator(name, *agg_extra) for name in ("rack-a", "rack-b")}
    for c in range(N):
        dep.start_client_via(c, ports["rack-a" if c < N // 2 else "rack-b"])
    return ports


def test_two_aggregators_give_the_flat_model_with_fewer_uploads(agg_env, hierarchy, tmp_path):
    sim = tmp_path / "sim"
    run_experiment(load_config(agg_env.config), sim, show_progress=False)
    sim_params = torch.load(sim / "checkpoint.pt", weights_only=False)["state"].params
    _start(hierarchy, agg_env.config)
    assert hierarchy.wait_server() == 0, hierarchy.server_log() + hierarchy.log_of("aggregator")
    summary, metrics = hierarchy.summary(), hierarchy.metrics()
    params = torch.load(hierarchy.out / "checkpoint.pt", weights_only=False)["state"].params
    assert summary["status"] == "completed" and summary["rounds"] == ROUNDS
    assert summary["updates"] == N * ROUNDS and summary["failed_tasks"] == 0
    assert torch.allclose(params, sim_params, atol=1e-5), (params - sim_params).abs().max()
    last = metrics[-1]
    # every round: one aggregate per aggregator instead of one update per client; an aggregator forwards early
    # (a smaller group, the same mean) when a client fetches its task only after the others' updates came back,
    # which a loaded machine makes happen now and then: at least 2 a round, fewer than the flat N
    received = last["uploads_received"]
    assert 2 * ROUNDS <= received < N * ROUNDS, received
    model_bytes = 4 * sim_params.numel()
    assert last["bytes_up"] == pytest.approx(received * model_bytes, rel=0.01)  # one model per message
    print(f"server received {last['uploads_received']} update messages, {last['bytes_up']} bytes "
          f"(flat: {N * ROUNDS} updates, {N * ROUNDS * model_bytes} bytes)")
    log = hierarchy.server_log()
    assert "aggregator rack-a connected" in log and "aggregator rack-b connected" in log
    for name, (proc, _) in hierarchy.aggregators.items():
        assert proc.wait(30) == 0, hierarchy.log_of("aggregator")
    assert "Traceback" not in hierarchy.server_log() + hierarchy.log_of("aggregator")


def _aggregate(address: str, token: str, header: pb.AggregateHeader, params: torch.Tensor | None = None) -> pb.Ack:
    blobs = []
    if params is not None:
        spec, blob = wire.encode_tensor("params", params)
        header.tensors.append(spec)
        blobs.append(blob)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FederationStub(channel)
        return stub.SendAggregate(wire.chunks(pb.Chunk(aggregate=header), blobs),
                                  metadata=[(gate.AGGREGATOR_KEY, token.encode())], timeout=20)


def test_aggregator_credentials_are_their_own(agg_env, hierarchy):
    """A bad aggregator token is refused before the stream is read; a client's token is no aggregator's (and an
    aggregator started with one exits with one line); an aggregator's token is no client's."""
    hierarchy.start_server(agg_env.config)
    hierarchy.wait_listening()
    client_token = agg_env.token_files[0].read_text().strip()

    def never():  # a stream whose header never comes: a server that read before checking would wait
        time.sleep(5)
        yield pb.Chunk(aggregate=pb.AggregateHeader())

    with grpc.insecure_channel(hierarchy.address) as channel:
        stub = pb_grpc.FederationStub(channel)
        for token in ("x" * 32, client_token):
            with pytest.raises(grpc.RpcError) as err:
                stub.SendAggregate(never(), metadata=[(gate.AGGREGATOR_KEY, token.encode())], timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # the aggregator's token as a client's
            stub.Join(pb.JoinRequest(device=pb.DeviceReport(n_samples=10)),
                      metadata=[(gate.TOKEN_KEY, b"a" * 32)], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _aggregate(hierarchy.address, "a" * 32, pb.AggregateHeader()).accepted  # the real one: a hello
    (agg_env.root / "token_client0_as_agg").write_text(client_token + "\n")
    result = run_cli("aggregator", "--parent", hierarchy.address, "--address", f"127.0.0.1:{free_port()}",
                     "--token-file", str(agg_env.root / "token_client0_as_agg"), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "refused this aggregator" in lines[-1] and "unknown token (as an aggregator's)" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_a_hierarchy_with_a_strategy_that_needs_each_update_is_refused(agg_env, tmp_path):
    config = write_config(tmp_path, data__n_clients=N, strategy__name="fedyogi")
    result = run_cli("server", str(config), "--address", f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "out"),
                     "--tokens", str(agg_env.tokens), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "strategy.name: fedyogi" in result.stderr and "fedavg, fedprox" in result.stderr
    assert "Traceback" not in result.stderr
    config = write_config(tmp_path, "secure.yaml", data__n_clients=N, deploy__secure_aggregation=True)
    result = run_cli("server", str(config), "--address", f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "out2"),
                     "--tokens", str(agg_env.tokens), timeout=120)
    assert result.returncode == 2 and "do not compose" in result.stderr, result.stderr


def test_a_forged_aggregate_is_rejected_and_the_run_goes_on(agg_env, hierarchy, tmp_path):
    """rack-b claims a task of a client that joined through rack-a: refused, the run completes (the forged claim
    fails nothing of rack-a's). 12 rounds: the run is still on when the forged claim comes, after the first."""
    config = write_config(tmp_path, data__n_clients=N, strategy__clients_per_round=N, rounds=12)
    _start(hierarchy, config, "--flush-s", "5")
    forged = {}

    def claim():
        for line in hierarchy.server_log().splitlines():
            if "aggregation 1:" in line:
                return True
        return False

    wait_for(claim, 180, "the first aggregation")
    header = pb.AggregateHeader(version=1, members=[_member(10_000, 0, 100)])
    forged["ack"] = _aggregate(hierarchy.address, "b" * 32, header, torch.zeros(1))
    assert not forged["ack"].accepted and "did not join through it" in forged["ack"].reason, forged["ack"]
    assert hierarchy.wait_server() == 0, hierarchy.server_log()
    assert hierarchy.summary()["status"] == "completed"
    assert "Traceback" not in hierarchy.server_log()


@pytest.mark.serial  # heartbeat timeouts: timing
def test_an_aggregator_killed_mid_run_fails_its_clients_tasks_and_the_run_ends(agg_env, hierarchy, tmp_path):
    config = write_config(tmp_path, data__n_clients=N, strategy__clients_per_round=N, rounds=6,
                          deploy={"heartbeat_timeout_s": 4, "poll_s": 2, "min_clients": N})
    _start(hierarchy, config)
    wait_for(lambda: "aggregation 2:" in hierarchy.server_log(), 180, "two aggregations")
    proc, _ = hierarchy.aggregators["rack-a"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert hierarchy.wait_server(180) == 0, hierarchy.server_log()
    summary = hierarchy.summary()
    assert summary["status"] == "completed" and summary["rounds"] == 6
    log = hierarchy.server_log()
    assert "client 0 silent" in log or "client 0 lost task" in log, log
    metrics = hierarchy.metrics()
    assert metrics[-1]["clients_connected"] <= N // 2
    devices = json.loads((hierarchy.out / "devices.json").read_text())
    assert devices[2]["participation"] == 6 and devices[0]["participation"] < 6
    assert "Traceback" not in log
