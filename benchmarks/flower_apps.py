"""The Flower side of ``flower_compare.py``: a ClientApp and a ServerApp running the same FedAvg workload.

Imported by the Flower measurement of ``flower_compare.py`` (in ``.venv-flower``, where flwr[simulation] is
installed) and, through Ray, by every simulation actor: the ClientApp is pickled by reference to this
module, so each actor imports it once and keeps its federation in :data:`_FEDERATION` between messages.

The workload comes from the environment variable :data:`SPEC_ENV` (JSON, set before
``run_simulation`` starts Ray; Ray's worker processes inherit it), so the actors build exactly the
federation (data, partition, model, initial weights) that hetfl's measurement builds, with the same
``workload`` function.

The client's ``train`` is hetfl's own ``LocalTrainer.train`` on the client's rows of ``fed.pool``, as
hetfl's simulator trains a task; parameters travel as one flat float32 array (an ArrayRecord of one
NumPy array: the cheapest message Flower can carry for this model).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_compare import workload
from hetfl.engine.run import Federation, build_federation

SPEC_ENV = "HETFL_FLOWER_COMPARE_SPEC"

_FEDERATION: dict[str, Federation] = {}  # one per process (an actor builds it at its first message)


def federation() -> Federation:
    spec = os.environ[SPEC_ENV]
    if spec not in _FEDERATION:
        _FEDERATION.clear()
        _FEDERATION[spec] = build_federation(workload(json.loads(spec), vectorize="off"))
    return _FEDERATION[spec]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One client update: hetfl's LocalTrainer.train from the received parameters on this client's data."""
    fed = federation()
    client = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    params = torch.from_numpy(msg.content["arrays"].to_numpy_ndarrays()[0])
    rows = fed.pool.train_indices[client]
    x, y = fed.pool.x[rows], fed.pool.y[rows]
    trainer = fed.trainer
    started = time.perf_counter()
    result = trainer.train(
        params, x, y, steps=trainer.steps_for(len(rows)), seed=server_round * fed.data.n_clients + client
    )
    reply = RecordDict({
        "arrays": ArrayRecord([result.params.numpy()]),
        "metrics": MetricRecord({
            "num-examples": len(rows),
            "train-s": time.perf_counter() - started,  # wall seconds in LocalTrainer.train
            "pid": os.getpid(),
            "cpu-s": time.process_time(),  # this actor's CPU seconds so far (all its threads)
        }),
    })
    return Message(content=reply, reply_to=msg)


def server_app(spec: dict[str, Any], marks: list[tuple[float, float]], out: dict[str, Any]) -> ServerApp:
    """FedAvg over ``spec['per_round']`` of ``spec['clients']`` nodes a round, ``spec['rounds']`` rounds.

    ``marks`` receives ``(time.perf_counter(), time.process_time())`` before round 1 and after every
    round (Flower calls ``evaluate_fn`` at those moments); ``out`` the final model's accuracy, evaluated
    (untimed) by hetfl's evaluator, and per round: the updates aggregated, their seconds in
    ``LocalTrainer.train`` and each actor's CPU seconds at its last reply (``rounds``).
    Federated evaluation is off (``fraction_evaluate=0``): only training rounds are timed.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        fed = federation()
        n, k, rounds = spec["clients"], spec["per_round"], spec["rounds"]

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
            marks.append((time.perf_counter(), time.process_time()))  # a round boundary; nothing is evaluated

        per_round: list[dict[str, Any]] = []

        def count_updates(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
            """Flower's hook for aggregating the replies' metrics: here, what the benchmark reports."""
            metrics = [r["metrics"] for r in replies]
            cpu: dict[str, float] = {}
            for m in metrics:
                pid = str(int(m["pid"]))
                cpu[pid] = max(cpu.get(pid, 0.0), float(m["cpu-s"]))
            per_round.append({"updates": len(replies), "train_s": sum(float(m["train-s"]) for m in metrics),
                              "actor_cpu_s": cpu})
            return MetricRecord({"updates": len(replies)})

        strategy = FedAvg(
            fraction_train=k / n,
            fraction_evaluate=0.0,
            min_train_nodes=k,
            min_available_nodes=n,
            train_metrics_aggr_fn=count_updates,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([fed.trainer.initial.numpy()]),
            num_rounds=rounds,
            evaluate_fn=evaluate_fn,
        )
        out["rounds"] = per_round
        out["accuracy"] = fed.evaluator(torch.from_numpy(result.arrays.to_numpy_ndarrays()[0]))["accuracy"]

    return app
