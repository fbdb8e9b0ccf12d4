"""The deployment's pieces in-process: the wire format, token files, backoff, and the commands' one-line errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import yaml

from hetfl.cli import main
from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy import wire
from hetfl.deploy.client import Backoff, parse_attack
from hetfl.deploy.tokens import TokenTable, load_tokens, write_tokens
from hetfl.errors import HetflError


def _roundtrip(tensors: dict[str, torch.Tensor], chunk_bytes: int, method: str = "none"):
    specs, blobs = [], []
    for name, t in tensors.items():
        spec, blob = wire.encode_tensor(name, t, method if t.is_floating_point() else "none")
        specs.append(spec)
        blobs.append(blob)
    header = pb.Chunk(update=pb.UpdateHeader(tensors=specs))
    stream = list(wire.chunks(header, blobs, chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in stream[1:])
    return stream, wire.collect(stream[0].update.tensors, iter(stream[1:]))


def test_a_tensor_larger_than_grpc_messages_travels_in_chunks():
    big = torch.randn(1_300_000)  # 5.2 MB of float32: more than gRPC's 4 MB default message
    mask = torch.tensor([True, False, True])
    stream, (tensors, metas, nbytes) = _roundtrip({"params": big, "payload:mask": mask}, 1 << 20)
    assert len(stream) == 1 + math.ceil(big.numel() * 4 / (1 << 20)) + 1  # header, 5 chunks of params, the mask
    assert torch.equal(tensors["params"], big) and torch.equal(tensors["payload:mask"], mask)
    assert nbytes == big.numel() * 4 + 3 and metas["params"]["method"] == "none"


def test_float16_halves_the_bytes_within_half_precision():
    t = torch.randn(1000)
    _, (tensors, _, nbytes) = _roundtrip({"params": t}, 4096, "float16")
    assert nbytes == 2000 and torch.allclose(tensors["params"], t, rtol=2**-11, atol=2**-24)


def test_a_truncated_or_overlong_stream_is_refused_in_one_line():
    stream, _ = _roundtrip({"params": torch.ones(1000)}, 1024)
    with pytest.raises(wire.WireError, match="ended after 3072 of 4000 bytes"):
        wire.collect(stream[0].update.tensors, iter(stream[1:-1]))
    with pytest.raises(wire.WireError, match="more bytes arrived"):
        wire.collect(stream[0].update.tensors, iter(stream[1:] + [pb.Chunk(data=b"x")]))
    with pytest.raises(wire.WireError, match="second header"):
        wire.collect(stream[0].update.tensors, iter([stream[0]]))


def test_task_options_split_into_json_scalars_and_tensors():
    scalars, tensors = wire.split_options({"lr": 0.1, "correction": torch.zeros(3)})
    assert scalars == {"lr": 0.1} and list(tensors) == ["correction"]
    with pytest.raises(ValueError, match="JSON scalars or tensors"):
        wire.split_options({"bad": object()})


def test_hetfl_tokens_registers_the_exported_sample_counts(tmp_path, capsys):
    from hetfl.cli import main

    parts = tmp_path / "parts"
    parts.mkdir()
    for c, n in enumerate([5, 7]):
        np.savez(parts / f"client_{c}.npz", x=np.zeros((n, 3), np.float32), y=np.zeros(n, np.int64))
    assert main(["tokens", "2", "--out", str(tmp_path / "t.yaml"), "--samples-from", str(parts)]) == 0
    assert load_tokens(tmp_path / "t.yaml", 2).samples == {0: 5, 1: 7}
    assert main(["tokens", "3", "--out", str(tmp_path / "u.yaml"), "--samples-from", str(parts)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --samples-from {parts}: no client_2.npz (written by hetfl partition CONFIG --export "
                   f"{parts} for 3 clients)") and not (tmp_path / "u.yaml").exists()


def test_token_files_yaml_and_csv(tmp_path):
    tokens = write_tokens(tmp_path / "t.yaml", 3)
    table = load_tokens(tmp_path / "t.yaml", 3)
    assert {table.identify(t)[0] for t in tokens} == {0, 1, 2}
    assert table.identify("x" * 40) == (None, "unknown token")
    assert (tmp_path / "t.yaml").stat().st_mode & 0o777 == 0o600
    csv = tmp_path / "t.csv"
    csv.write_text("token,client_id,revoked\n" + "a" * 20 + ",0,\n" + "b" * 20 + ",1,yes\n")
    table = load_tokens(csv, 2)
    assert table.identify("a" * 20) == (0, "") and table.identify("b" * 20) == (None, "the token was revoked")


def test_revoked_wins_over_listed():
    table = TokenTable({"a" * 20: 0}, {"a" * 20})
    assert table.identify("a" * 20) == (None, "the token was revoked")


@pytest.mark.parametrize("content, message", [
    ("tokens: [1, 2]", "expected a mapping 'tokens: {TOKEN: CLIENT_ID"),
    ("tokens: {short: 0}", "use at least 16"),
    ("tokens: {" + "a" * 20 + ": 7}", "client id 7 is outside 0..2"),
    ("tokens: {" + "a" * 20 + ": 0, " + "b" * 20 + ": 0}", "client id 0 has more than one token"),
    ("tokens: {" + "a" * 20 + ": zero}", "must be an integer"),
    ("tokens: {}\nextra: 1", "unknown key 'extra'"),
    ("tokens: {: [", "not valid YAML"),
])
def test_bad_token_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(HetflError, match=f"{path}.*{message}".replace("[", r"\[").replace("{", r"\{")):
        load_tokens(path, 3)


def test_backoff_grows_to_its_cap_with_jitter():
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(0))
    waits = [backoff.next() for _ in range(12)]
    assert all(0.05 <= w <= 4.0 for w in waits) and max(waits[:2]) <= 1.0 and max(waits[6:]) > 1.0
    backoff.reset()
    assert backoff.next() <= 0.5


def test_attack_spec():
    assert parse_attack("scaled-random:10") == ("scaled-random", 10.0)
    for bad in ("scaled-random", "scaled-random:-1", "flip:3"):
        with pytest.raises(HetflError, match="expected scaled-random:SCALE"):
            parse_attack(bad)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_client_mistakes_are_one_line_errors(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("a" * 30)
    assert "--data missing.npz: no such file" in _one_line_error(
        capsys, ["client", "--server", "127.0.0.1:1", "--token-file", str(token), "--data", "missing.npz"])
    assert "--server localhost: expected HOST:PORT" in _one_line_error(
        capsys, ["client", "--server", "localhost", "--token-file", str(token), "--data", "x.npz"])
    assert "--token-file nope: no such file" in _one_line_error(
        capsys, ["client", "--server", "127.0.0.1:1", "--token-file", "nope", "--data", "x.npz"])
    assert "--tls-ca ca.pem: no such file" in _one_line_error(
        capsys, ["client", "--server", "127.0.0.1:1", "--token-file", str(token), "--data", "x.npz", "--tls-ca", "ca.pem"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    assert "not a readable .npz file" in _one_line_error(
        capsys, ["client", "--server", "127.0.0.1:1", "--token-file", str(token), "--data", str(bad)])


def test_server_mistakes_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3}}))
    assert "no token file" in _one_line_error(capsys, ["server", str(config), "--out", str(tmp_path / "o")])
    assert "--tokens t.yaml: no such file" in _one_line_error(
        capsys, ["server", str(config), "--out", str(tmp_path / "o"), "--tokens", "t.yaml"])
    write_tokens(tmp_path / "t.yaml", 3)
    assert "--tls-cert cert.pem: no such file" in _one_line_error(capsys, [
        "server", str(config), "--out", str(tmp_path / "o"), "--tokens", str(tmp_path / "t.yaml"),
        "--tls-cert", "cert.pem", "--tls-key", "key.pem"])
    assert "--tls-cert and --tls-key go together" in _one_line_error(capsys, [
        "server", str(config), "--out", str(tmp_path / "o"), "--tokens", str(tmp_path / "t.yaml"), "--tls-cert", "c.pem"])
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3},
                                      "strategy": {"name": "fedbuff"}, "deploy": {"secure_aggregation": True}}))
    assert "deploy.secure_aggregation: fedbuff does not aggregate by a weighted mean" in _one_line_error(
        capsys, ["server", str(config), "--out", str(tmp_path / "o"), "--tokens", str(tmp_path / "t.yaml")])
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3},
                                      "deploy": {"secure_aggregation": True, "max_update_norm": 20.0}}))
    assert "deploy.max_update_norm bounds each update, which secure aggregation hides" in _one_line_error(
        capsys, ["server", str(config), "--out", str(tmp_path / "o"), "--tokens", str(tmp_path / "t.yaml")])


def test_partition_export_writes_each_clients_training_data(tmp_path, capsys):
    import numpy as np

    from hetfl.config import load_config
    from hetfl.data import federate

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "digits", "n_clients": 3, "partition": {"kind": "dirichlet"}}}))
    assert main(["partition", str(config), "--export", str(tmp_path / "parts")]) == 0
    fed = federate(load_config(config).data, 0)
    for c in range(3):
        with np.load(tmp_path / "parts" / f"client_{c}.npz") as npz:
            assert np.array_equal(npz["x"], fed.dataset.x[fed.train[c]]) and np.array_equal(npz["y"], fed.dataset.y[fed.train[c]])
    with np.load(tmp_path / "parts" / "test.npz") as npz:
        assert len(npz["y"]) == sum(len(t) for t in fed.test)


def test_secure_rounds_unmask_a_dropped_member_and_hand_fedavg_the_survivors_mean():
    """Three members, one fails after the others masked: the survivors reveal their masks with it, and the
    strategy receives, for each survivor, the start plus the sample-weighted mean of the survivors' changes."""
    import json as _json
    import threading
    from types import SimpleNamespace

    import numpy as np

    from hetfl.config import DeployConfig
    from hetfl.deploy.secagg import MaskingClient
    from hetfl.deploy.secure import SecureRounds
    from hetfl.engine.core import Counters, EngineCore
    from hetfl.strategies.base import Task

    received, failed, controls = [], [], []
    strategy = SimpleNamespace(on_update=lambda s, u: received.append(u), on_failure=lambda s, t: failed.append(t),
                               compute_steps=lambda steps: steps)
    keys = {c: MaskingClient(seed=c) for c in range(3)}
    start = torch.zeros(6)
    tasks = {c: Task(task_id=c, client_id=c, version=0, params=start, steps=5, dispatched_at=0.0) for c in range(3)}
    server = SimpleNamespace(
        deploy=DeployConfig(), lock=threading.Lock(), handed_out=set(), now=1.0, version=0,
        conns={c: SimpleNamespace(public_key=keys[c].public_key) for c in range(3)},
        state=SimpleNamespace(busy=dict(tasks), client_stats={}, counters=Counters.for_clients(3), strategy=strategy,
                              version=0),
        num_samples=lambda c: [10, 20, 30][c],
        send_control=lambda c, header: controls.append((c, _json.loads(header.secagg_json))),
    )
    server.core = EngineCore(server, server.state, diverged_advice="")  # builds the updates
    server._forget = lambda task: server.state.busy.pop(task.client_id)
    server._deliver = lambda update: (strategy.on_update(server, update), (True, ""))[1]

    def fail(task, reason, **_):
        server._forget(task)
        rounds.failed(task)
        failed.append(task)

    server.fail = fail
    rounds = SecureRounds(server)
    for t in tasks.values():
        rounds.join_cohort(t)
    (t0, header), *_ = sealed = rounds.seal()
    assert len(sealed) == 3 and set(header["peers"]) == {0, 1, 2}
    assert header["weights"] == {"0": 10, "1": 20, "2": 30}  # the weights the clients mask n_k * delta with
    peers = {int(k): bytes.fromhex(v) for k, v in header["peers"].items()}
    models = {0: torch.full((6,), 1.0), 1: torch.full((6,), -2.0)}
    for c, w in models.items():
        masked = keys[c].mask((server.num_samples(c) * (w - start)).double().numpy(), peers, c, header["round"],
                              clip=header["clip"], scale=header["scale"])
        ok, _ = rounds.on_masked(tasks[c], SimpleNamespace(steps=5, loss=0.5), torch.from_numpy(masked.view(np.int32).copy()))
        assert ok
    fail(tasks[2], "no heartbeat")  # member 2 never sends: survivors 0 and 1 must unmask
    assert sorted(c for c, _ in controls) == [0, 1] and all(req["dropped"] == [2] for _, req in controls)
    for c, request in controls:
        share = keys[c].unmask_share(request["dropped"], peers, c, request["round"], 6)
        header = SimpleNamespace(stats_json=_json.dumps({"dropped": request["dropped"]}))
        assert rounds.on_share(c, header, {"share": torch.from_numpy(share.view(np.int32).copy())}) == (True, "")
    expected = (10 * 1.0 + 20 * -2.0) / 30  # the survivors' sample-weighted mean change
    assert [u.client_id for u in received] == [0, 1] and [u.n_samples for u in received] == [10, 20]
    for u in received:
        assert torch.allclose(u.params, torch.full((6,), expected), atol=1e-3)
    assert [t.client_id for t in failed] == [2] and not server.state.busy


class _Context:
    """What the gate asks of a gRPC servicer context."""

    def __init__(self, peer: str = "ipv4:10.0.0.9:5000") -> None:
        self._peer, self.cancelled, self.code = peer, False, None

    def peer(self) -> str:
        return self._peer

    def add_callback(self, callback) -> bool:
        return True

    def abort(self, code, details):
        self.code = code
        raise RuntimeError(details)

    def cancel(self) -> None:
        self.cancelled = True


def test_the_gate_bounds_calls_per_address_and_per_session():
    import grpc

    from hetfl.deploy.gate import MAX_CALLS_PER_SESSION, SESSION_KEY, Gate, Limits, host_of

    assert host_of("ipv4:10.0.0.9:5000") == "10.0.0.9" and host_of("ipv6:[::1]:5000") == "[::1]"
    gate = Gate(TokenTable({"a" * 20: 0}), {"s1": 0, "s2": 1, "s3": 2}.get, Limits(max_calls_per_peer=2))
    try:
        calls = [gate.admit("Heartbeat", {SESSION_KEY: s}, _Context()) for s in ("s1", "s2")]
        refused = _Context()
        with pytest.raises(RuntimeError, match="too many calls at once: 10.0.0.9 has 2 calls open"):
            gate.admit("Heartbeat", {SESSION_KEY: "s3"}, refused)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.admit("Heartbeat", {SESSION_KEY: "s3"}, _Context("ipv4:10.0.0.10:5000"))  # another address
        gate.release(calls[0])
        gate.admit("Heartbeat", {SESSION_KEY: "s3"}, _Context())  # a slot is free again
        for code, metadata in ((grpc.StatusCode.UNAUTHENTICATED, {}), (grpc.StatusCode.NOT_FOUND, {SESSION_KEY: "zz"})):
            context = _Context("ipv4:10.0.0.11:1")
            with pytest.raises(RuntimeError):
                gate.admit("SendUpdate", metadata, context)
            assert context.code == code
        wide = Gate(TokenTable({}), lambda s: 0, Limits(max_calls_per_peer=100))
        for _ in range(MAX_CALLS_PER_SESSION):
            wide.admit("Heartbeat", {SESSION_KEY: "s"}, _Context())
        with pytest.raises(RuntimeError, match=f"this session has {MAX_CALLS_PER_SESSION} calls open"):
            wide.admit("Heartbeat", {SESSION_KEY: "s"}, _Context())
        wide.close()
    finally:
        gate.close()


def test_the_gate_rate_limits_failed_joins_per_address(monkeypatch):
    import grpc

    from hetfl.deploy import gate as gate_module
    from hetfl.deploy.gate import TOKEN_KEY, Gate, Limits

    now = [1000.0]
    monkeypatch.setattr(gate_module.time, "monotonic", lambda: now[0])
    gate = Gate(TokenTable({"a" * 20: 0}), lambda s: None, Limits(max_failed_joins=3))
    try:
        for _ in range(3):
            context = _Context()
            with pytest.raises(RuntimeError, match="unknown token"):
                gate.admit("Join", {TOKEN_KEY: b"b" * 20}, context)
            assert context.code == grpc.StatusCode.UNAUTHENTICATED
        context = _Context()
        with pytest.raises(RuntimeError, match="too many failed joins from 10.0.0.9; retry in 60 s"):
            gate.admit("Join", {TOKEN_KEY: b"a" * 20}, context)  # before its token is looked at, valid or not
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert gate.admit("Join", {TOKEN_KEY: b"a" * 20}, _Context("ipv4:10.0.0.10:1")).client == 0  # another address
        now[0] += 61  # the minute is over
        assert gate.admit("Join", {TOKEN_KEY: b"a" * 20}, _Context()).client == 0
        with pytest.raises(RuntimeError, match="no token in the call"):
            gate.admit("Join", {}, _Context("ipv4:10.0.0.12:1"))
    finally:
        gate.close()


def test_the_watchdog_cancels_a_call_past_its_deadline():
    import time

    from hetfl.deploy.gate import SESSION_KEY, Gate, Limits

    gate = Gate(TokenTable({}), lambda s: 0, Limits(call_timeout_s=0.3, min_transfer_Bps=1000))
    try:
        slow, quick = _Context(), _Context()
        gate.admit("SendUpdate", {SESSION_KEY: "s"}, slow)
        gate.expect(1000)  # 1000 bytes at 1000 B/s: a second more
        call = gate.admit("Heartbeat", {SESSION_KEY: "t"}, quick)
        gate.release(call)  # finished in time: never cancelled
        time.sleep(0.8)
        assert not slow.cancelled  # 0.3 s + 1 s
        deadline = time.monotonic() + 5
        while not slow.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.cancelled and not quick.cancelled
    finally:
        gate.close()
