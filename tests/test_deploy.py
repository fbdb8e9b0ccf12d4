"""Real deployments on loopback: one ``hetfl server`` and five ``hetfl client`` processes over gRPC.

The same config and seed run by the simulator and by the deployment train on the same data (the exported
partition) with the same task seeds, so FedAvg with every client in every round gives the same models up to
floating-point summation order: we check the parameters to 1e-5 and the accuracy of every round to one test
sample in 360 (both are in fact equal here). FedCompass's schedule depends on measured wall-clock speeds,
so only its accuracy is compared, within 5 points.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from hetfl.config import load_config
from hetfl.engine.run import run_experiment
from test_deploy_support import (
    N_CLIENTS,
    Deployment,
    make_certificates,
    make_env,
    run_cli,
    wait_for,
    write_config,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("deploy"))


@pytest.fixture
def deployment(env, tmp_path):
    dep = Deployment(env, tmp_path / "run")
    yield dep
    dep.close()


@pytest.fixture(scope="module")
def simulated_fedavg(env, tmp_path_factory):
    """The simulator's run of the shared config: the reference every deployment is compared with."""
    out = tmp_path_factory.mktemp("sim") / "fedavg"
    summary = run_experiment(load_config(env.config), out, show_progress=False)
    params = torch.load(out / "checkpoint.pt", weights_only=False)["state"].params
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, params, metrics


def test_fedavg_over_grpc_equals_the_simulator(env, deployment, simulated_fedavg):
    sim_summary, sim_params, sim_metrics = simulated_fedavg
    deployment.start_server(env.config)
    deployment.start_clients()
    assert deployment.wait_server() == 0, deployment.server_log()
    summary, metrics = deployment.summary(), deployment.metrics()
    params = torch.load(deployment.out / "checkpoint.pt", weights_only=False)["state"].params
    assert summary["status"] == "completed" and summary["rounds"] == 10
    assert summary["final_accuracy"] >= 0.85
    assert torch.allclose(params, sim_params, atol=1e-5), (params - sim_params).abs().max()
    assert [m["round"] for m in metrics] == [m["round"] for m in sim_metrics]
    for ours, theirs in zip(metrics, sim_metrics):
        assert abs(ours["accuracy"] - theirs["accuracy"]) <= 1 / 360 + 1e-12, (ours["round"], ours["accuracy"], theirs["accuracy"])
    assert metrics[-1]["rejected"] == 0 and metrics[-1]["clients_connected"] == N_CLIENTS
    devices = json.loads((deployment.out / "devices.json").read_text())
    assert all(d["step_s"] > 0 and d["participation"] == 10 for d in devices)  # measured and reported


def test_fedcompass_over_grpc_reaches_the_simulators_accuracy(env, deployment, tmp_path):
    # five clients on one machine over loopback are alike: the simulator gets identical devices too, so
    # both form groups of similar size (with the default lognormal devices its groups are smaller and
    # each aggregation moves the model less). The deployment ignores the devices section: it measures.
    identical = {"compute": {"distribution": "constant"}, "network": {"tiers": {"ethernet": 1.0}}, "jitter": 0.0}
    config = write_config(tmp_path, strategy__name="fedcompass", rounds=25, devices=identical)
    sim = run_experiment(load_config(config), tmp_path / "sim", show_progress=False)
    deployment.start_server(config)
    deployment.start_clients()
    assert deployment.wait_server() == 0, deployment.server_log()
    summary = deployment.summary()
    assert summary["rounds"] == 25 and summary["final_accuracy"] >= 0.85
    assert abs(summary["final_accuracy"] - sim["final_accuracy"]) <= 0.05, (summary["final_accuracy"], sim["final_accuracy"])
    last = deployment.metrics()[-1]
    assert last["compass_groups"] >= 1  # FedCompass formed arrival groups from measured speeds


@pytest.fixture(scope="module")
def faulty_run(env, tmp_path_factory):
    """One run with four faulty clients: 0 sends NaNs once, 1 a model of the wrong shape once, 2 claims a billion
    samples, 4 dies on its third task."""
    dep = Deployment(env, tmp_path_factory.mktemp("faults") / "run")
    try:
        dep.start_server(env.config)
        dep.start_clients(per_client={0: ("--fault", "nan-once"), 1: ("--fault", "bad-shape-once"),
                                      2: ("--fault", "claim-samples:1000000000"), 4: ("--fault", "die-on-task:3")})
        assert dep.wait_server() == 0, dep.server_log()
        yield dep
    finally:
        dep.close()


def test_nan_and_wrong_shape_updates_are_rejected_and_the_run_converges(faulty_run):
    log = faulty_run.server_log()
    assert "client 0: update for task 0 rejected: 24 non-finite values" in log
    assert "client 1: update for task 1 rejected: shape (2400,) != expected (2410,)" in log
    summary, last = faulty_run.summary(), faulty_run.metrics()[-1]
    assert last["rejected"] == 2
    # round 1 aggregated 3 updates (two rejected), round 3 four (client 4 died), rounds 4-10 four each
    assert summary["updates"] == 3 + 5 + 4 * 8
    assert summary["participation"][:2] == [9, 9]  # never aggregated the rejected ones
    assert summary["final_accuracy"] >= 0.85


def test_a_claimed_sample_count_weighs_no_more_than_the_registered_one(env, faulty_run):
    registered = env.samples[2]
    assert (f"client 2 claims 1000000000 samples at its join (registered {registered}): weighted as {registered}"
            in faulty_run.server_log())
    devices = json.loads((faulty_run.out / "devices.json").read_text())
    assert devices[2]["n_samples"] == 1_000_000_000 and devices[2]["weight"] == registered
    assert faulty_run.summary()["final_accuracy"] >= 0.85  # its updates weighed as one client's, not a billion's


def test_a_client_killed_mid_task_does_not_stall_the_server(faulty_run):
    log = faulty_run.server_log()
    assert "client 4 lost task 14: no heartbeat for" in log
    summary, last = faulty_run.summary(), faulty_run.metrics()[-1]
    assert summary["status"] == "completed" and summary["rounds"] == 10
    assert last["timed_out"] == 1 and summary["participation"][4] == 2
    assert faulty_run.clients[4].wait(10) == -signal.SIGKILL
    assert all(p.wait(30) == 0 for p in faulty_run.clients[:4])


def test_killed_then_interrupted_server_resumes_with_every_update(env, deployment, tmp_path):
    config = write_config(tmp_path, rounds=14)
    deployment.start_server(config)
    deployment.start_clients()
    metrics = deployment.out / "metrics.jsonl"

    def logged() -> int:
        return len([line for line in metrics.read_text().splitlines() if line.strip()]) if metrics.is_file() else 0

    wait_for(lambda: logged() >= 5, 180, "4 aggregations")
    deployment.server.send_signal(signal.SIGKILL)  # a crash
    deployment.server.wait(10)
    logged_round = max(json.loads(line)["round"] for line in metrics.read_text().splitlines() if line.strip())
    saved = torch.load(deployment.out / "checkpoint.pt", weights_only=False)["state"].version
    assert saved >= logged_round  # checkpointed after every aggregation: nothing aggregated is lost
    time.sleep(1.0)  # the clients notice and back off
    deployment.start_server(config)
    wait_for(lambda: logged() >= 10, 180, "9 aggregations after the restart")
    deployment.server.send_signal(signal.SIGINT)  # an operator's Ctrl-C: the state is saved, the run is not over
    assert deployment.server.wait(60) == 130, deployment.server_log()
    assert deployment.summary()["status"] == "interrupted"
    time.sleep(2.0)
    assert all(p.poll() is None for p in deployment.clients)  # not told the run is over: they keep retrying
    deployment.start_server(config)
    assert deployment.wait_server() == 0, deployment.server_log()
    log = deployment.server_log()
    assert f"resumed from {deployment.out / 'checkpoint.pt'} at aggregation {saved}" in log
    assert log.count("resumed from") == 2
    # the tasks in flight at each stop went again to their clients (none failed, no round closed short)
    assert "sent again (in flight when the server stopped)" in log and "in flight when the server stopped;" not in log
    rounds = [m["round"] for m in deployment.metrics()]
    assert rounds == list(range(15))  # metrics.jsonl continues: every version once, none lost or repeated
    summary = deployment.summary()
    assert summary["status"] == "completed" and summary["final_accuracy"] >= 0.85
    assert summary["updates"] == 14 * N_CLIENTS  # every aggregation had every client's update
    assert all(p.wait(30) == 0 for p in deployment.clients)  # every client rejoined and was told the run ended


def test_tls_is_required_tokens_are_checked_and_large_models_stream(env, deployment, tmp_path):
    certs = make_certificates(tmp_path)
    # 64*2048 + 2048*512 + 512*10 weights and biases: 1.18 M parameters, 4.7 MB a transfer: five 1 MiB chunks,
    # while the server accepts messages of 2 MiB at most (chunk_bytes + 1 MiB)
    config = write_config(tmp_path, rounds=1, model__hidden=[2048, 512], training__local_steps=1,
                          strategy__clients_per_round=2, deploy__min_clients=2)
    deployment.start_server(config, "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"]))
    tls = ("--tls-ca", str(certs["ca"]))
    deployment.wait_listening()
    # a plaintext client cannot talk to a TLS server, and says so in seconds (not after --give-up-after's
    # 600 s of retries), in one line naming the server and what to give
    started = time.monotonic()
    plain = run_cli("client", "--server", deployment.address, "--token-file", str(env.token_files[0]),
                    "--data", str(env.parts / "client_0.npz"), "--quiet")
    assert plain.returncode == 2 and time.monotonic() - started < 60, plain.stderr
    assert plain.stderr.strip() == (f"error: the server at {deployment.address} speaks TLS and this client does not: "
                                    "give --tls-ca CA.pem (the authority that signed the server's certificate)")
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-a-token-of-this-server-0123456789")
    revoked = tmp_path / "revoked_token"
    revoked.write_text(env.revoked_token)
    for token_file, reason in ((wrong, "unknown token"), (revoked, "the token was revoked")):
        refused = run_cli("client", "--server", deployment.address, "--token-file", str(token_file),
                          "--data", str(env.parts / "client_0.npz"), *tls, "--quiet")
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"error: the server at {deployment.address} refused this client: {reason}")
        assert len(refused.stderr.strip().splitlines()) == 1  # --quiet: nothing but the error
    deployment.start_clients(*tls, clients=[0, 1])
    assert deployment.wait_server() == 0, deployment.server_log()
    summary = deployment.summary()
    assert summary["rounds"] == 1 and summary["updates"] == 2
    assert summary["bytes_up"] > 2 * 4_700_000 and summary["bytes_down"] > 2 * 4_700_000
    assert "refused a join" in deployment.server_log() and "unknown token" in deployment.server_log()


def test_secure_aggregation_gives_fedavgs_model(env, deployment, tmp_path, simulated_fedavg):
    _, sim_params, _ = simulated_fedavg
    config = write_config(tmp_path, deploy__secure_aggregation=True)
    deployment.start_server(config)
    deployment.start_clients()
    assert deployment.wait_server() == 0, deployment.server_log()
    params = torch.load(deployment.out / "checkpoint.pt", weights_only=False)["state"].params
    # fixed point at scale 1000: each client's n_k * delta is off by at most 5e-4 a coordinate, the mean by
    # about 5 * 5e-4 / 1797 samples per round; ten rounds drift a little further through training
    assert torch.allclose(params, sim_params, atol=1e-3), (params - sim_params).abs().max()
    assert deployment.summary()["final_accuracy"] >= 0.85
    assert "secure aggregation round 9: sum of 5 masked update(s) decoded" in deployment.server_log()


def test_robust_aggregation_resists_20_percent_attackers(env, deployment, tmp_path, simulated_fedavg):
    clean, _, _ = simulated_fedavg
    # the median against the attacker, not the norm bound (which rejects its noise: deploy.update_norm adaptive)
    config = write_config(tmp_path, strategy__aggregator={"rule": "median"}, deploy__update_norm={"rule": "off"})
    deployment.start_server(config)
    deployment.start_clients(per_client={4: ("--attack", "scaled-random:10")})  # 1 of 5 clients: 20%
    assert deployment.wait_server() == 0, deployment.server_log()
    summary = deployment.summary()
    assert summary["final_accuracy"] >= clean["final_accuracy"] - 0.05, (summary["final_accuracy"], clean["final_accuracy"])


@pytest.fixture(scope="module")
def attacked_scaffold(env, tmp_path_factory):
    """SCAFFOLD with four misbehaving clients: 0 sends its delta_c with shape (7,) once, 1 none once, 2 its start
    model + 255 everywhere on its third task, 3 takes its second task and only heartbeats; 4 is honest."""
    folder = tmp_path_factory.mktemp("scaffold")
    config = write_config(folder, strategy__name="scaffold", deploy__task_timeout_floor_s=3)
    dep = Deployment(env, folder / "run")
    try:
        dep.start_server(config)
        dep.start_clients(per_client={0: ("--fault", "bad-payload-once"), 1: ("--fault", "no-payload-once"),
                                      2: ("--fault", "plus-255-on-task:3"), 3: ("--fault", "heartbeat-only-on-task:2")})
        assert dep.wait_server() == 0, dep.server_log()
        yield dep
    finally:
        dep.close()


def test_a_scaffold_payload_of_the_wrong_shape_or_none_is_rejected_and_the_server_goes_on(attacked_scaffold):
    log = attacked_scaffold.server_log()
    assert "client 0: update for task 0 rejected: payload delta_c: shape (7,) != expected (2410,)" in log
    assert "client 1: update for task 1 rejected: payload delta_c is missing" in log
    assert "Traceback" not in log
    summary = attacked_scaffold.summary()
    assert summary["status"] == "completed" and summary["rounds"] == 10 and summary["final_accuracy"] >= 0.85
    assert all(attacked_scaffold.clients[c].wait(30) == 0 for c in (0, 1, 2, 4))  # told the run ended


def test_a_plus_255_update_is_rejected_by_the_default_norm_bound(attacked_scaffold):
    log = attacked_scaffold.server_log()
    rejected = [line for line in log.splitlines() if "client 2: update for task" in line and "rejected" in line]
    assert len(rejected) == 1 and "(deploy.update_norm adaptive)" in rejected[0], rejected
    # no honest update was taken for an attack: three rejected in all (two payloads, the +255)
    assert attacked_scaffold.metrics()[-1]["rejected"] == 3
    assert "deploy.update_norm adaptive" not in log.replace(rejected[0], "")


def test_a_client_that_only_heartbeats_times_out_and_rounds_go_to_the_others(attacked_scaffold):
    log = attacked_scaffold.server_log()
    lost = [line for line in log.splitlines() if "client 3 lost task" in line]
    assert lost and all("not returned within" in line and "task_timeout_s auto" in line for line in lost), lost
    assert "client 3 silent" not in log  # it heartbeats: alive, but its task is not coming
    last = attacked_scaffold.metrics()[-1]
    assert last["timed_out"] == len(lost) and attacked_scaffold.summary()["rounds"] == 10
    # benched after each timeout: later rounds went to the four others instead of waiting on client 3 again; every
    # round had the others' updates (less the three rejected), client 3 only its first
    summary = attacked_scaffold.summary()
    assert summary["participation"] == [9, 9, 9, 1, 10] and summary["updates"] == 38


def test_a_client_on_a_slow_link_takes_part(env, deployment, tmp_path):
    # client 0's link moves 2,000 bytes/s: each 9.6 kB transfer of the model (one chunk) takes about 5 s, longer than
    # heartbeat_timeout_s; it heartbeats meanwhile (before: only while it trained), so it is alive throughout and
    # its task is not lost
    config = write_config(tmp_path, rounds=1, strategy__clients_per_round=1,
                          deploy={"heartbeat_timeout_s": 3, "poll_s": 2, "min_clients": 1, "chunk_bytes": 65536})
    deployment.start_server(config)
    deployment.start_clients(clients=[0], per_client={0: ("--fault", "slow-link:2000")})
    assert deployment.wait_server() == 0, deployment.server_log()
    log = deployment.server_log()
    assert "silent" not in log and "lost task" not in log, log
    summary = deployment.summary()
    assert summary["rounds"] == 1 and summary["participation"][0] == 1 and summary["updates"] == 1
    devices = json.loads((deployment.out / "devices.json").read_text())
    assert devices[0]["down_Bps"] < 3000 and devices[0]["round_trip_s"] > 2 * 3  # it was that slow
