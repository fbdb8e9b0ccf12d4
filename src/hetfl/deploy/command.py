"""``hetfl server``: a deployed run's folder, federation and logging around the engine (:mod:`hetfl.deploy.engine`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from hetfl.config import ExperimentConfig, dump_config, load_config
from hetfl.deploy.engine import DeployServer, ServerOptions
from hetfl.deploy.tokens import check_address, check_server_tls, load_tokens, read_pem
from hetfl.devices.table import DeviceTable
from hetfl.errors import ConfigError, DivergedError, HetflError

log = logging.getLogger("hetfl.server")


def serve_command(
    config: str, *, address: str, out: str, overrides: list[str] | None = None, tokens: str | None = None,
    tls_cert: str | None = None, tls_key: str | None = None, tls_client_ca: str | None = None,
    min_clients: int | None = None, fresh: bool = False, quiet: bool = False,
) -> dict[str, Any]:
    """``hetfl server``: run ``config`` with real clients at ``address``; results in ``out`` (resumed if it has a checkpoint).

    One process per run folder and per port: ``out`` is locked (:func:`hetfl.results.outdir.lock_out`) and the port
    bound without SO_REUSEPORT before anything is written, so a second server on either is refused in one line."""
    from hetfl.results.outdir import lock_out

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    check_address(address)
    with lock_out(out):
        return _serve(config, address=address, out=out, overrides=overrides, tokens=tokens, tls_cert=tls_cert,
                      tls_key=tls_key, tls_client_ca=tls_client_ca, min_clients=min_clients, fresh=fresh)


def _serve(
    config: str, *, address: str, out: str, overrides: list[str] | None, tokens: str | None, tls_cert: str | None,
    tls_key: str | None, tls_client_ca: str | None, min_clients: int | None, fresh: bool,
) -> dict[str, Any]:
    from hetfl.engine.run import CHECKPOINT, Run, check_resumable_change, build_federation
    from hetfl.results.outdir import check_server_out, clear_run

    out_dir = Path(out)
    resume = check_server_out(out_dir, fresh=fresh)  # a run's folder, new or empty; refused before anything is written
    cfg = load_config(config, overrides)
    if (tls_cert is None) != (tls_key is None):
        raise HetflError("--tls-cert and --tls-key go together (the server's certificate and its private key)")
    if tls_client_ca is not None and tls_cert is None:
        raise HetflError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    cert, key, client_ca = read_pem(tls_cert, "--tls-cert"), read_pem(tls_key, "--tls-key"), read_pem(tls_client_ca, "--tls-client-ca")
    check_server_tls(tls_cert, tls_key, tls_client_ca)  # a wrong key is one line naming it, not "cannot listen"
    token_file = tokens or cfg.deploy.tokens
    if token_file is None:
        raise HetflError("no token file: give --tokens FILE or set deploy.tokens (hetfl tokens N --out FILE makes one)")
    table = load_tokens(token_file, cfg.data.n_clients)
    need = min_clients or cfg.deploy.min_clients or cfg.data.n_clients
    if need > len(table.clients):
        raise ConfigError(f"min_clients {need}: the token file {token_file} lets only {len(table.clients)} clients in")
    if resume:  # the federation must be the checkpoint's: compare with the config the run was started with
        check_resumable_change(load_config(out_dir / "config.yaml"), cfg)
    fed = build_federation(cfg)
    strategy = fed.strategy()
    if not strategy.global_model:
        raise ConfigError(
            f"strategy.name: {strategy.name} has no global model for the server to evaluate; "
            "deployment runs algorithms with a global model"
        )
    if cfg.strategy.partial_work:
        raise ConfigError(
            "strategy.partial_work: simulated only; a deployed server does not know a client's speed beforehand, "
            "so it cannot size the steps that meet the deadline; set it false for hetfl server"
        )
    if cfg.aggregation.hierarchy.fan_in is not None:
        raise ConfigError(
            "aggregation.hierarchy: simulated only; a deployment's leaf aggregators are `hetfl aggregator --parent "
            "HOST:PORT` processes with tokens under 'aggregators:' in the token file (docs/deployment.md); remove the key"
        )
    if cfg.deploy.secure_aggregation and not strategy.linear_aggregation:
        raise ConfigError(
            f"deploy.secure_aggregation: {strategy.name} does not aggregate by a weighted mean of the updates, "
            "which is all the server learns under secure aggregation; use fedavg or fedprox"
        )
    if cfg.deploy.secure_aggregation and _robust(cfg):
        raise ConfigError("deploy.secure_aggregation: a robust aggregator needs each update, which secure aggregation hides")
    privacy = getattr(cfg.strategy, "privacy", None)
    if cfg.deploy.secure_aggregation and privacy is not None and privacy.enabled:
        raise ConfigError("deploy.secure_aggregation: strategy.privacy clips each client's change at the server, which "
                          "secure aggregation hides; use one or the other")
    if cfg.deploy.secure_aggregation and cfg.deploy.max_update_norm is not None:
        raise ConfigError("deploy.secure_aggregation: deploy.max_update_norm bounds each update, which secure "
                          "aggregation hides (clients clip each entry to deploy.secagg_clip instead); use one or the other")
    if table.aggregators:
        _check_hierarchy(cfg, strategy, token_file)
    server = DeployServer(cfg, fed, strategy, ServerOptions(address, table, cert, key, client_ca, need))
    server.bind()  # before anything is written: a port another process holds is refused here
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_run(out_dir)  # an earlier run's files (--fresh, or one that never checkpointed); nothing else
    (out_dir / "config.yaml").write_text(dump_config(cfg))
    _log_to_file(out_dir / "server.log")
    run = Run(cfg, out_dir, fed, strategy, resume=resume, engine=server)
    if resume:
        server._resumed = True
        log.info("resumed from %s at aggregation %d (%.1f s into the run)", out_dir / CHECKPOINT, server.version,
                 server.state.elapsed)
        if _last_logged_round(out_dir / "metrics.jsonl") != server.version and (
                cfg.evaluation.due(server.version, server.now, run.scores.last.get("sim_time_s"))
                or server.version >= cfg.rounds):
            run.evaluate()  # killed between the checkpoint and its metrics line: write it now
    status = "completed"
    try:
        status = server.serve(run)
    except DivergedError:
        server.finished.set()
        server.shutdown()
        run.finish("diverged")  # summary.json says so, as the simulator's does; the CLI prints the error
        raise
    except Exception as err:  # the trackers are told (on_end, status failed); the CLI prints the error
        run.failed(err)
        raise
    finally:
        server.finished.set()
    if run.scores.last.get("round") != server.version:
        run.evaluate()
    server.save()
    server.shutdown()
    _write_devices(out_dir / "devices.json", server)
    # summary.json's client_speed: the speeds measured here, not those of the (ignored) devices section
    run.fed = replace(run.fed, profiles=DeviceTable.from_profiles(server.profiles))
    return run.finish(status)


def _check_hierarchy(cfg: ExperimentConfig, strategy: Any, token_file: str) -> None:
    """Aggregators (the token file's ``aggregators``) forward a weighted mean: only a strategy that aggregates by it
    takes them, and not under secure aggregation."""
    if cfg.deploy.secure_aggregation:
        raise ConfigError(f"deploy.secure_aggregation: the token file {token_file} lists aggregators, which read their "
                          "clients' updates to pre-aggregate them; secure aggregation and aggregators do not compose "
                          "(drop one)")
    if not strategy.linear_aggregation:
        raise ConfigError(f"strategy.name: {strategy.name} does not aggregate by the updates' weighted mean, which is "
                          f"what an aggregator forwards (the token file {token_file} lists aggregators); use a strategy "
                          "with linear_aggregation (fedavg, fedprox), or remove 'aggregators' from the token file")


def _robust(cfg: ExperimentConfig) -> bool:
    aggregator = getattr(cfg.strategy, "aggregator", None)
    rule = getattr(aggregator, "rule", None) if aggregator is not None else None
    return rule not in (None, "mean") or getattr(aggregator, "max_update_norm", None) is not None


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("hetfl").addHandler(handler)


def _write_devices(path: Path, server: DeployServer) -> None:
    """What each client reported and was measured to do: ``devices.json`` in the run directory."""
    st = server.state
    rows = []
    for c in range(server.n_clients):
        p = st.profiles[c]
        rows.append({
            "client_id": c, "n_samples": st.n_samples.get(c), "weight": server.num_samples(c) if c in st.n_samples else None,
            **st.measured.get(c, {}),
            "speed": p.speed if p.tier == "measured" else None, "participation": int(st.counters.participation[c]),
        })
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2, default=float))
    os.replace(tmp, path)


def _last_logged_round(path: Path) -> int | None:
    from hetfl.results.metrics import read_metrics

    records = read_metrics(path) if path.is_file() else []
    return records[-1]["round"] if records else None

