"""Real deployments on loopback: one ``hetfl server`` and five ``hetfl client`` processes over gRPC.

The same config and seed run by the simulator and by the deployment train on the same data (the exported
partition) with the same task seeds, so FedAvg with every client in every round gives the same models up to
floating-point summation order: we check the parameters to 1e-5 and the accuracy of every round to one test
sample in 360 (both are in fact equal here). FedCompass's schedule depends on measured wall-clock speeds,
so only its accuracy is compared, within 5 points.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from hetfl.config import load_config
from hetfl.engine.run import run_experiment
from test_deploy_support import deployment, env  # noqa: F401 - fixtures
from test_deploy_support import N_CLIENTS, finish, make_certificates, start_cli, write_config


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
    # where the time went, from real timestamps: every client downloaded and trained; every second of a client's
    # arrived tasks is in one phase, and those plus its idle time fit in the run's duration
    last, times = metrics[-1], summary["client_time_s"]
    assert all(d > 0 and c > 0 for d, c in zip(times["download"], times["compute"]))
    assert last["time_compute_s"] == pytest.approx(sum(times["compute"]))
    phases = sum(last[f"time_{p}_s"] for p in ("wait", "download", "compute", "upload", "idle"))
    assert phases <= N_CLIENTS * last["sim_time_s"] + 1e-6
    assert 0 < last["server_busy_s"] < last["sim_time_s"]  # the aggregations and evaluations, timed


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
    # (the three refused clients run at once: one process start-up instead of three)
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-a-token-of-this-server-0123456789")
    revoked = tmp_path / "revoked_token"
    revoked.write_text(env.revoked_token)
    started = time.monotonic()
    plain = start_cli("client", "--server", deployment.address, "--token-file", str(env.token_files[0]),
                      "--data", str(env.parts / "client_0.npz"), "--quiet")
    refusals = {reason: start_cli("client", "--server", deployment.address, "--token-file", str(token_file),
                                  "--data", str(env.parts / "client_0.npz"), *tls, "--quiet")
                for token_file, reason in ((wrong, "unknown token"), (revoked, "the token was revoked"))}
    plain = finish(plain)
    assert plain.returncode == 2 and time.monotonic() - started < 60, plain.stderr
    assert plain.stderr.strip() == (f"error: the server at {deployment.address} speaks TLS and this client does not: "
                                    "give --tls-ca CA.pem (the authority that signed the server's certificate)")
    for reason, refused in refusals.items():
        refused = finish(refused)
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
