"""One experiment, end to end: build the federation, simulate, evaluate, write the results.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one evaluation a line),
``summary.json`` and ``checkpoint.pt`` (server state between events, for ``--resume``).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hetfl import registry
from hetfl.config import ExperimentConfig, dump_config, load_config
from hetfl.data import FederatedData, federate
from hetfl.data.synthetic import SyntheticData, SyntheticPool
from hetfl.devices import DeviceTable, build_profiles
from hetfl.devices.byzantine import Byzantine
from hetfl.engine.backends import build_backend, code_roots
from hetfl.engine.core import Engine
from hetfl.engine.hierarchy import Hierarchy
from hetfl.engine.server_time import ServerTime
from hetfl.engine.simulator import ClientModels, ClientPool, Simulator
from hetfl.engine.store import memory_budget
from hetfl.errors import ConfigError, DivergedError, HetflError
from hetfl.models import build_model, flops_per_sample
from hetfl.models.assign import assign_architectures
from hetfl.models.cost import BACKWARD_FACTOR, training_flops
from hetfl.results import MetricsLog, format_duration, record_run, write_summary
from hetfl.results.outdir import CHECKPOINT_NAME, check_run_out, clear_run, lock_out
from hetfl.results.tracking import RunInfo, Trackers, build_trackers
from hetfl.results.variant import variant_label
from hetfl.strategies import Strategy, build_strategy
from hetfl.training import LocalTrainer
from hetfl.training.evaluate import Evaluator
from hetfl.training.local import short_error

CHECKPOINT = CHECKPOINT_NAME
PROGRESS_TOTAL = 1000  # the bar's resolution: it shows a fraction of the run, not a count


def progress(version: int, rounds: int, now: float, max_sim_time_s: float | None) -> tuple[int, str]:
    """How far the run is (out of :data:`PROGRESS_TOTAL`) and the text beside the bar.

    The run ends at ``rounds`` aggregations or at ``max_sim_time_s`` simulated seconds, whichever
    comes first, so the bar follows whichever of the two is nearer its limit (an asynchronous run
    commits once per update, where rounds say little). The text puts that one first, against its
    limit, and the other as a plain count: ``sim 5.0 min / 10.0 min  12 rounds`` for a run bounded
    by time (``rounds`` huge), not ``12/100000 rounds``.
    """
    by_rounds = version / rounds if rounds > 0 else 1.0
    if max_sim_time_s is None:
        return round(PROGRESS_TOTAL * min(by_rounds, 1.0)), f"{version}/{rounds} rounds  sim {format_duration(now)}"
    by_time = now / max_sim_time_s if max_sim_time_s > 0 else 1.0
    if by_time > by_rounds:
        where = f"sim {format_duration(now)} / {format_duration(max_sim_time_s)}  {version} rounds"
    else:
        where = f"{version}/{rounds} rounds  sim {format_duration(now)} / {format_duration(max_sim_time_s)}"
    return round(PROGRESS_TOTAL * min(max(by_rounds, by_time), 1.0)), where


@dataclass
class Federation:
    """Everything a run is built from, made deterministically from the config and its seed."""

    config: ExperimentConfig
    data: FederatedData | SyntheticData
    profiles: DeviceTable  # a sequence of DeviceProfile, stored as columns
    trainer: LocalTrainer
    evaluator: Evaluator
    pool: ClientPool
    flops_per_step: float
    models: ClientModels  # each client's architecture (one trainer for all without a model zoo)
    byzantine: Byzantine | None = None  # devices.byzantine's attackers (a backdoor's poisoned data is in the pool)

    def describe(self, strategy: Strategy | None = None) -> str:
        """One line: what is being simulated; what a transfer carries is the ``strategy``'s
        (:meth:`Strategy.describe_transfer`, default: the config's), e.g. only adapters for fedlora."""
        cfg, data = self.config, self.data
        if cfg.client is not None:  # a Flower client's own data and model (hetfl.flower)
            return data.describe(self, strategy or self.strategy())
        n_train = int(data.train_sizes.sum())
        n_test = int(data.test_sizes.sum())
        validation = getattr(data, "validation", None)
        held = f" / {sum(len(v) for v in validation)} validation" if validation else ""
        scored = f", scored on {cfg.evaluation.split}" if validation else ""
        speeds = np.asarray(self.profiles.speed)  # a DeviceTable's column
        spread = float(speeds.max() / speeds.min())
        if cfg.model.zoo:
            counts = np.bincount(self.models.of_client, minlength=len(self.models.trainers))
            model = "zoo of " + ", ".join(
                f"{t.label} ({_size(t)}, {f / 1e6:.2f} MFLOP a step) x{k}"
                for t, f, k in zip(self.models.trainers, self.models.flops_per_step, counts)
            )
        else:
            transfer = (strategy or self.strategy()).describe_transfer(self.trainer)
            model = (
                f"{cfg.model.name}: {_size(self.trainer)}, {transfer}, "
                f"{self.flops_per_step / 1e6:.2f} MFLOP a step"
            )
        return (
            f"{cfg.data.dataset}: {data.n_clients} clients ({n_train} train / {n_test} test{held} samples, "
            f"{'generated per client' if cfg.data.dataset == 'synthetic' else f'{cfg.data.partition.kind} partition'}"
            f"{scored}); "
            f"{model}; device speeds span {spread:.1f}x"
        )

    def evaluation_flops(self, strategy: Strategy) -> float:
        """Forward FLOPs of one evaluation, what ``server.flops`` times: the global model on every evaluation
        sample, and each client's own model on its samples where the strategy scores personal models (the
        reference architecture's price; a personal model's fine-tuning, where a strategy does one, is not counted).
        0 when the evaluation is not the server's: a Flower client's run evaluates on the clients (their ``evaluate``)."""
        samples = getattr(self.evaluator, "y", None)
        if samples is None:
            return 0.0
        forward = self.flops_per_step / (BACKWARD_FACTOR * self.config.training.batch_size)
        passes = int(strategy.global_model) + int(strategy.personalised or not strategy.global_model)
        return forward * len(samples) * passes

    def strategy(self) -> Strategy:
        cfg = self.config
        strategy = build_strategy(cfg.strategy, cfg.training, cfg.model)
        if cfg.client is not None:  # only strategies whose client half is plain training can run a Flower client
            from hetfl.flower import check_strategy

            check_strategy(strategy, self.trainer, cfg)
        check_architectures(strategy, len(np.unique(self.models.of_client)))
        strategy.check_models(self.models.trainers)
        strategy.check_devices(self.profiles)
        if getattr(strategy, "public_samples", 0):
            strategy.set_public(*self.public_split(strategy.name, strategy.public_samples))
        return strategy

    def public_split(self, name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples the server holds as public data (fedconv learns on them): drawn with the run's seed from the
        pooled validation splits (``data.validation_fraction``), which no client trains on."""
        validation = getattr(self.data, "validation", None)
        if not validation or not sum(len(v) for v in validation):
            raise ConfigError(f"data.validation_fraction: {name} learns on public samples the server holds, taken from "
                              "the validation split; set data.validation_fraction (e.g. 0.1)")
        pooled = np.concatenate(validation)
        pick = np.sort(np.random.default_rng([self.config.seed, 7]).permutation(pooled)[:n])
        ds = self.data.dataset
        return torch.from_numpy(ds.x[pick]), torch.from_numpy(ds.y[pick])

    def simulator(self, strategy: Strategy | None = None, on_commit=None) -> Simulator:
        cfg = self.config
        return Simulator(
            strategy=strategy or self.strategy(),
            trainer=self.trainer,
            pool=self.pool,
            profiles=self.profiles,
            flops_per_step=self.flops_per_step,
            seed=cfg.seed,
            jitter=cfg.devices.jitter,
            on_commit=on_commit,
            max_sim_time_s=cfg.max_sim_time_s,
            models=self.models,
            byzantine=self.byzantine or attackers(cfg, len(self.profiles)),
            server_time=ServerTime.from_config(cfg.server),
            hierarchy=Hierarchy.from_config(cfg.aggregation.hierarchy) if cfg.aggregation.hierarchy.fan_in else None,
            backend=build_backend(cfg.backend, threads=cfg.threads, training=cfg.training, roots=code_roots(cfg.code))
            if cfg.client is None else self.trainer.backend(),  # a Flower client trains in its fit (hetfl.flower)
        )


def attackers(cfg: ExperimentConfig, n_clients: int) -> Byzantine | None:
    """``devices.byzantine``'s attackers, None without any."""
    return Byzantine(cfg.devices.byzantine, n_clients, cfg.seed) if cfg.devices.byzantine.fraction else None


def _size(trainer: LocalTrainer) -> str:
    """``1,362 parameters`` (and ``+ 48 buffer entries``: BatchNorm's running statistics travel with them)."""
    params = trainer.numel - trainer.n_buffers
    return f"{params:,} parameters" + (f" + {trainer.n_buffers:,} buffer entries" if trainer.n_buffers else "")


def check_architectures(strategy: Strategy, architectures: int) -> None:
    """Refuse a single-architecture ``strategy`` for clients that train ``architectures`` different ones."""
    if architectures > 1 and not strategy.model_heterogeneous:
        raise ConfigError(
            f"model.zoo: {strategy.name} trains one architecture on every client, and the zoo assigns {architectures}; "
            "use a model-heterogeneous algorithm (marked [model zoo: yes] by hetfl algorithms) or drop model.zoo"
        )


def build_federation(cfg: ExperimentConfig) -> Federation:
    torch.set_num_threads(cfg.threads)
    if cfg.devices.byzantine.fraction and cfg.devices.byzantine.attack == "backdoor" and (
            cfg.client is not None or cfg.data.dataset == "synthetic"):
        raise ConfigError("devices.byzantine.attack: backdoor poisons hetfl's stored training samples; a Flower client's "
                          "data and data.dataset synthetic (generated per task) have none")
    if cfg.client is not None:  # a Flower client_fn brings its own data and model: its clients are calibrated
        from hetfl.flower import build_federation as flower_federation

        return flower_federation(cfg)
    data = SyntheticData(cfg.data, cfg.seed) if cfg.data.dataset == "synthetic" else federate(cfg.data, cfg.seed)
    profiles = build_profiles(cfg.devices, data.n_clients, np.random.default_rng([cfg.seed, 4]))
    torch.manual_seed(cfg.seed)  # initialises the reference model, then each zoo architecture in turn
    trainer, flops = build_trainer_for(cfg.model, cfg, data)
    if cfg.model.zoo:
        zoo = [build_trainer_for(arch, cfg, data, key=f"model.zoo.{i}.name") for i, arch in enumerate(cfg.model.zoo)]
        for member, _ in zoo:
            member.reference = trainer
        models = ClientModels([t for t, _ in zoo], [f for _, f in zoo], assign_architectures(cfg.model, profiles))
    else:
        models = ClientModels.single(trainer, flops, data.n_clients)
    if isinstance(data, SyntheticData):  # samples generated per client on demand; a fixed subset of clients is the test set
        pool: ClientPool | SyntheticPool = SyntheticPool(data)
        x_test, y_test, owner = data.test_set()
        evaluator = Evaluator(trainer, x_test, y_test, owner, data.n_clients, data.drift)
        _check_batchable(cfg, models, pool)
        return Federation(cfg, data, profiles, trainer, evaluator, pool, flops, models)
    ds = data.dataset
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y)
    byzantine = attackers(cfg, data.n_clients)
    train_x, train_y, train = x, y, data.train
    if byzantine is not None:  # a backdoor's attackers train on poisoned copies of some of their samples
        byzantine.check(ds.n_classes, tuple(ds.input_shape), ds.vocab_size is not None)
        train_x, train_y, train = byzantine.poison(x, y, data.train)
    pool = ClientPool(train_x, train_y, train, ds.n_classes, data.drift, data.unlabelled).to(trainer.device)  # one index array, offsets; data once
    evaluator = Evaluator.from_splits(trainer, x, y, data.evaluation_split(cfg.evaluation.split), data.drift)
    _check_batchable(cfg, models, pool)
    return Federation(cfg, data, profiles, trainer, evaluator, pool, flops, models, byzantine)


def _check_batchable(cfg: ExperimentConfig, models: ClientModels, pool: ClientPool | SyntheticPool) -> None:
    """``training.vectorize: on`` (in process or on Ray) refuses, before the run, an architecture ``train_many`` cannot train
    (:meth:`LocalTrainer.batching_problem`, probed on two samples of the first client that has any)."""
    if cfg.training.vectorize != "on" or cfg.backend.name not in ("inprocess", "ray"):
        return
    client = next((c for c in range(pool.n_clients) if pool.n_samples(c) > 0), None)
    if client is None:
        return
    sample = pool.data(client, 0.0)
    for i in np.unique(models.of_client).tolist():
        trainer = models.trainers[i]
        problem = trainer.batching_problem(sample.x[:2], sample.y[:2])
        if problem is not None:
            raise ConfigError(
                f"training.vectorize: on, but {trainer.label} cannot be trained batched: {problem}; set "
                "training.vectorize to auto (trains it one task at a time) or off"
            )


def build_trainer_for(arch, cfg: ExperimentConfig, data: FederatedData, key: str = "model.name", *,
                      count_flops: bool = True) -> tuple[LocalTrainer, float]:
    """A trainer of architecture ``arch`` (the reference or a zoo member, named by the config key ``key``) and the
    FLOPs of one of its steps (0 with ``count_flops`` False: a deployed client, which prices nothing, runs the same
    forward pass on zeros without torch's FLOP counter, whose first use imports ``torch._dynamo``, about 1.6 CPU-s).

    With ``model.pretrained`` a TinyLM starts from the pretrained base (:mod:`hetfl.models.pretrain`):
    its ``trainer.initial``, what every client and the server start from. A model of one's own is run once on a
    sample of zeros (to count its FLOPs): a forward pass that fails, or logits of the wrong shape, are a one-line
    ConfigError naming ``key``."""
    ds = data  # input_shape, n_classes, vocab_size: a FederatedData's or a SyntheticData's
    model = build_model(arch, ds.input_shape, ds.n_classes, ds.vocab_size, cfg.model.feature_dim, key=key)
    if cfg.model.pretrained and arch.name == "tinylm":
        from hetfl.models.pretrain import load_or_pretrain

        load_or_pretrain(model, cfg.model.pretrain, cfg.data, cfg.seed)
    try:
        forward = flops_per_sample(model, ds.input_shape, token_input=ds.vocab_size is not None) if count_flops else 0.0
        if not count_flops or not registry.is_builtin("model", arch.name):
            _check_logits(model, ds, key, arch.label())
    except HetflError:
        raise
    except Exception as err:  # the user's forward pass failed: one line with its file and line
        if os.environ.get("HETFL_DEBUG"):
            raise
        raise ConfigError(
            f"{key}: {arch.label()} failed on one sample of shape {tuple(ds.input_shape)}: {short_error(err)}"
        ) from None
    trainer = LocalTrainer(model, cfg.training, arch.label(), key=key)
    trainer.input_shape, trainer.token_input = tuple(ds.input_shape), ds.vocab_size is not None
    return trainer, training_flops(forward, cfg.training.batch_size) if count_flops else 0.0


def _check_logits(model: torch.nn.Module, ds: Any, key: str, label: str) -> None:
    """A model of one's own must give one logit per class for a sample (per position, for next-token targets)."""
    shape = tuple(ds.input_shape)
    token = ds.vocab_size is not None
    model.eval()  # as the trainer holds it outside training (BatchNorm on one sample)
    with torch.no_grad():
        out = model(torch.zeros((1, *shape), dtype=torch.long if token else torch.float32))
    sequence = getattr(ds, "sequence_targets", None)  # None: not known (a deployed client's setup)
    shapes = {False: [(1, ds.n_classes)], True: [(1, *shape, ds.n_classes)], None: [(1, ds.n_classes), (1, *shape, ds.n_classes)]}
    expected = shapes[sequence][-1 if sequence else 0]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) not in shapes[sequence]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{key}: {label} gives {got} for one sample of shape {shape}; expected logits of shape {expected} "
            f"({'one per token and class' if len(expected) > 2 else 'one per class'})"
        )


def _perplexity(loss: float) -> float:
    """exp(mean next-token cross-entropy): the language-model score of an evaluation."""
    return math.exp(loss) if loss < 700 else math.inf


# A language model's default target: this share of the perplexity of the first evaluation (the starting model).
LM_TARGET_FRACTION = 0.95


@dataclass
class Scoreboard:
    """What the summary needs from the evaluations seen so far. The target is an accuracy, or for a language
    model (its records have ``perplexity``) a perplexity to get down to: ``target_perplexity``, set from the
    first evaluation (``LM_TARGET_FRACTION`` x its perplexity) when the config leaves it unset."""

    target: float
    best_accuracy: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)
    time_to_target_s: float | None = None
    rounds_to_target: int | None = None
    target_perplexity: float | None = None

    def observe(self, record: dict[str, Any]) -> None:
        self.last = record
        self.best_accuracy = max(self.best_accuracy, record["accuracy"])
        perplexity = record.get("perplexity")
        if perplexity is not None and self.target_perplexity is None and math.isfinite(perplexity):
            self.target_perplexity = LM_TARGET_FRACTION * perplexity
        if perplexity is None:
            reached = record["accuracy"] >= self.target
        else:
            reached = self.target_perplexity is not None and perplexity <= self.target_perplexity
        if self.time_to_target_s is None and reached:
            self.time_to_target_s = record["sim_time_s"]
            self.rounds_to_target = record["round"]


class Run:
    """A run directory being written: evaluation, logging, checkpoints and the summary."""

    def __init__(
        self, cfg: ExperimentConfig, out: Path, fed: Federation, strategy: Strategy, *, resume: bool,
        engine: Engine | None = None, trackers: list[Any] = (), group: str | Path | None = None,
    ) -> None:
        """``engine``: the server the strategy runs on, the simulator by default; the deployment server
        (:mod:`hetfl.deploy.engine`) passes itself and gets this run's evaluation, logging and checkpoints.
        ``trackers``: tracker objects (:mod:`hetfl.results.tracking`) besides those ``cfg.tracking`` names; every
        evaluation goes to them as it is written, and the summary when the run ends (whatever its status);
        ``group``: the comparison folder this run is one of (``hetfl compare``), which they are told."""
        self.cfg, self.out, self.fed = cfg, out, fed
        self.scores = Scoreboard(cfg.evaluation.target_accuracy, target_perplexity=cfg.evaluation.target_perplexity)
        self.wall_before = 0.0  # wall seconds spent by earlier processes (resume)
        self.sim: Engine  # the simulator, or the deployment server; :meth:`execute` drives the simulator only
        if engine is None:
            self.sim = fed.simulator(strategy, on_commit=self._on_commit)  # on resume, the checkpoint's replaces it
        else:
            self.sim = engine
            engine.on_commit = self._on_commit
        self.trackers = Trackers(build_trackers(cfg, out, list(trackers)))
        self.group = Path(group).resolve() if group is not None else None
        resumed_round = self._load_checkpoint() if resume else None
        self.log = MetricsLog(out / "metrics.jsonl", resume_from_round=resumed_round)
        self.started = time.perf_counter()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.progress: Progress | None = None
        self.bar: Any = None
        self.trackers.start(self._run_info(resumed_round, "deploy" if engine is not None else cfg.backend.name))
        if resumed_round is None:
            try:
                self.evaluate()  # round 0: the initial model
            except Exception as err:
                self.failed(err)
                raise

    def _run_info(self, resumed_from: int | None, engine: str) -> RunInfo:
        """What the trackers are told at the start (:class:`hetfl.results.tracking.RunInfo`)."""
        cfg, algorithm = self.cfg, self.sim.strategy.name
        config = cfg.model_dump(mode="json")
        variant = variant_label(config["strategy"])
        tags = {"algorithm": algorithm, "seed": str(cfg.seed), "variant": variant or algorithm, "dataset": cfg.data.dataset,
                "engine": engine, "run_dir": str(self.out.resolve()), **({"comparison": str(self.group)} if self.group else {})}
        return RunInfo(self.out.resolve().name, self.out, cfg.name, algorithm, variant, cfg.seed, _flatten(config), tags,
                       resumed_from, self.group.name if self.group else None)

    # ------------------------------------------------------------------ measurements
    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the global model; append one record (``docs/metrics.md``) to metrics.jsonl."""
        sim, evaluator = self.sim, self.fed.evaluator
        c = sim.counters
        sim.server_work(self.fed.evaluation_flops(sim.strategy))
        if sim.strategy.global_model:
            scores = evaluator(sim.params, sim.now)
            personal = evaluator.personal(sim.params, sim.personal_model, sim.now) if sim.strategy.personalised else {}
        else:  # no global model (model-heterogeneous FL): the clients' own models are what there is to score
            personal = evaluator.personal(sim.params, sim.personal_model, sim.now)
            scores = {
                "accuracy": personal["personal_accuracy"],
                "loss": personal["personal_loss"],
                "client_acc_mean": personal["personal_acc_mean"],
                "client_acc_p10": personal["personal_acc_p10"],
                "client_acc_min": personal["personal_acc_min"],
            }
        record = {
            "round": sim.version,
            "sim_time_s": sim.now,
            "wall_time_s": self.wall_time(),
            **scores,
            **({"perplexity": _perplexity(scores["loss"])} if self.fed.data.sequence_targets else {}),
            "bytes_up": c.bytes_up,
            "bytes_down": c.bytes_down,
            "updates": c.updates,
            "dropped": c.dropped,
            "train_flops": c.trained_flops,
            "partial_updates": c.partial,
            **sim.fairness(),  # starts a new staleness window
            **sim.time_breakdown(),
            **sim.engine_metrics(),
            **personal,
        }
        byzantine = self.fed.byzantine
        if byzantine is not None and byzantine.backdoor:  # the global model on trigger-stamped evaluation samples
            record["backdoor_asr"] = (byzantine.success_rate(lambda x: self.fed.trainer.predict(sim.params, x), evaluator.x,
                                                             evaluator.y) if sim.strategy.global_model else None)
        for key, value in sim.strategy.metrics().items():
            if key in record:
                raise ValueError(
                    f"{type(sim.strategy).__name__}.metrics() returned {key!r}, which the engine already "
                    "writes to metrics.jsonl; rename it"
                )
            record[key] = value
        self.log.append(record)
        self.trackers.metrics(record)
        self.scores.observe(record)
        return record

    def _on_commit(self, sim: Engine) -> None:
        cfg = self.cfg
        last_round = sim.version >= cfg.rounds
        if cfg.evaluation.due(sim.version, sim.now, self.scores.last.get("sim_time_s")) or last_round:
            self.evaluate()
            if cfg.evaluation.stop_at_target and self.scores.time_to_target_s is not None:
                sim.stop("target reached")
        if last_round:
            sim.stop("rounds")
        if self.bar is not None:
            self._update_bar()

    def _update_bar(self) -> None:
        sim, cfg = self.sim, self.cfg
        completed, where = progress(sim.version, cfg.rounds, sim.now, cfg.max_sim_time_s)
        acc = self.scores.last.get("accuracy", float("nan"))
        self.progress.update(self.bar, completed=completed, where=where, acc=f"{acc:.3f}")  # type: ignore[union-attr]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save({"state": self.sim.state, "wall_time_s": self.wall_time(), "scores": self.scores}, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def _load_checkpoint(self) -> int:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise HetflError(f"{path}: no checkpoint to resume from")
        saved = read_checkpoint(path)
        if not hasattr(saved["state"].counters, "trained_flops"):
            raise HetflError(f"{path}: written by an older hetfl, without the FLOP counters; start a new run")
        if isinstance(saved["state"].client_state, dict):
            raise HetflError(f"{path}: written by an older hetfl, without the client-state store; start a new run")
        self.sim.state = saved["state"]
        memory_mb, store = self.cfg.training.state_memory_mb, getattr(self.sim, "client_store", None)
        if store is not None:  # the budget may differ from the checkpoint's (--set on resume): it changes no result
            store.set_budget(memory_budget(memory_mb))
        self.wall_before = saved["wall_time_s"]
        self.scores = saved["scores"]
        return self.sim.version

    # ------------------------------------------------------------------ the loop
    def execute(self, show_progress: bool = True, console: Console | None = None) -> dict[str, Any]:
        status = "completed"
        sim, every = self.sim, self.cfg.checkpoint_every
        if not isinstance(sim, Simulator):
            raise TypeError(f"Run.execute drives the simulator, not a {type(sim).__name__} (which runs itself)")
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[where]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(), console=console, disable=not show_progress, transient=False,
        )
        try:
            with self.progress:
                completed, where = progress(sim.version, self.cfg.rounds, sim.now, self.cfg.max_sim_time_s)
                self.bar = self.progress.add_task(
                    escape(sim.strategy.name), total=PROGRESS_TOTAL, completed=completed, where=where, acc="-"
                )
                if sim.version >= self.cfg.rounds:
                    sim.stop("rounds")  # resumed a finished run: nothing to do
                else:
                    sim.proceed()
                while sim.step():
                    if sim.checkpoint_due and sim.version % every == 0:
                        self.save_checkpoint()
                        sim.checkpoint_due = False
                self._update_bar()  # where it stopped (a time limit, say, between two commits)
        except KeyboardInterrupt:
            status = "interrupted"
        except DivergedError:
            self.finish("diverged")
            raise
        except Exception as err:
            self.failed(err)
            raise
        finally:
            sim.close()  # the backend's workers (a local Ray it started) are released, whatever happened
        if status == "completed":
            if sim.stop_reason == "stalled":
                status = "stalled"
            if self.scores.last.get("round") != sim.version or sim.stop_reason == "time limit":
                self.evaluate()
            self.save_checkpoint()
        return self.finish(status)

    def finish(self, status: str) -> dict[str, Any]:
        self.log.close()
        last, c = self.scores.last, self.sim.counters
        fairness = self.sim.fairness(window=False)
        summary = {
            "name": self.cfg.name,
            "algorithm": self.sim.strategy.name,  # the class's own name, else what the config calls it
            "status": status,
            "stop_reason": self.sim.stop_reason,
            "seed": self.cfg.seed,
            "dataset": self.cfg.data.dataset,
            "n_clients": self.cfg.data.n_clients,
            "final_accuracy": last.get("accuracy"),
            "best_accuracy": self.scores.best_accuracy,
            "final_loss": last.get("loss"),
            "final_perplexity": last.get("perplexity"),
            "client_acc_mean": last.get("client_acc_mean"),
            "client_acc_p10": last.get("client_acc_p10"),
            "client_acc_min": last.get("client_acc_min"),
            "personal_acc_mean": last.get("personal_acc_mean"),
            "personal_acc_p10": last.get("personal_acc_p10"),
            "personal_acc_min": last.get("personal_acc_min"),
            "rounds": self.sim.version,
            "sim_time_s": self.sim.now,
            "wall_time_s": self.wall_time(),
            "bytes_up": c.bytes_up,
            "bytes_down": c.bytes_down,
            "updates": c.updates,
            "dropped": c.dropped,
            "failed_tasks": c.failed,
            "trained_steps": c.trained_steps,
            "train_flops": c.trained_flops,
            "flops_per_task": c.trained_flops / c.arrived if c.arrived else None,
            "partial_updates": c.partial,
            "partial_work_mean": c.partial_work / c.partial if c.partial else None,
            "architectures": [t.label for t in self.fed.models.trainers],
            "architecture": self.fed.models.of_client.tolist(),
            "device": str(self.fed.trainer.device),
            "staleness_histogram": {str(k): v for k, v in sorted(c.staleness.items())},
            "staleness_mean": fairness["staleness_mean"],
            "staleness_max": fairness["staleness_max"],
            "participation": c.participation.tolist(),
            "tasks_per_client": c.dispatched.tolist(),
            "client_speed": self.fed.profiles.speed.tolist(),
            "client_time_s": self.sim.client_time(),
            "participation_jain": fairness["participation_jain"],
            "participated_frac": fairness["participated_frac"],
            "idle_fast_frac": fairness["idle_fast_frac"],
            "idle_frac": fairness["idle_frac"],
            "target_accuracy": self.scores.target,
            "target_perplexity": self.scores.target_perplexity,
            "time_to_target_s": self.scores.time_to_target_s,
            "rounds_to_target": self.scores.rounds_to_target,
            "started_at": self.started_at,
            "strategy_summary": self.sim.strategy.summary(self.sim),
            "code": {key: record.model_dump(mode="json") for key, record in self.cfg.code.items()},
        }
        write_summary(self.out / "summary.json", summary)
        record_run(self.out, summary)
        self.trackers.end(summary)
        return summary

    def failed(self, err: BaseException) -> None:
        """The run stopped on an exception: the trackers' ``on_end`` gets status ``failed`` and the error (no
        summary.json is written)."""
        self.log.close()
        self.trackers.end({
            "name": self.cfg.name, "algorithm": self.sim.strategy.name, "status": "failed", "error": short_error(err),
            "seed": self.cfg.seed, "rounds": self.sim.version, "sim_time_s": self.sim.now, "wall_time_s": self.wall_time(),
        })


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents; one line naming the file when it is empty, truncated or not a checkpoint."""
    if path.stat().st_size == 0:
        raise HetflError(f"{path}: the checkpoint is empty (0 bytes: written by a process that was stopped?); "
                         "start anew (hetfl server --fresh, or hetfl run --overwrite)")
    try:
        saved = torch.load(path, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as err:  # a class the pickle names is not where it was
        missing = getattr(err, "name", None) or str(err)
        if str(missing).startswith("hetfl") or "hetfl." in str(err):
            raise HetflError(f"{path}: written by another version of hetfl, whose state this one cannot read "
                             f"({str(err).splitlines()[0][:200]}); finish that run with the hetfl that started it, or "
                             "start anew (hetfl server --fresh, or hetfl run --overwrite)") from None
        raise HetflError(f"{path}: the checkpoint needs code that cannot be imported ({str(err).splitlines()[0][:200]}); "
                         "make it importable (the code section of config.yaml says from where), or start anew") from None
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (a broken zip), OSError (EINVAL), ...
        why = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise HetflError(f"{path}: not a readable checkpoint, truncated or not one ({why}); start anew "
                         "(hetfl server --fresh, or hetfl run --overwrite)") from None
    if not isinstance(saved, dict) or not {"state", "scores", "wall_time_s"} <= set(saved) or not hasattr(saved["state"], "counters"):
        raise HetflError(f"{path}: not a hetfl checkpoint; start anew (hetfl server --fresh, or hetfl run --overwrite)")
    return saved


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    show_progress: bool = True,
    console: Console | None = None,
    describe: bool = True,
    overwrite: bool = True,
    trackers: list[Any] = (),
    group: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` into the directory ``out``: created, or empty, or an earlier run, which is replaced only if
    ``overwrite`` (``hetfl run --overwrite``; from Python the default). Anything else is refused before anything
    is written (:func:`hetfl.results.outdir.check_run_out`: a folder of other files, the root, home or current
    folder); replacing a run removes only hetfl's own files there (and its row in the run index).

    With a ``console`` and ``show_progress``, a progress bar, and first (if ``describe``) one line
    saying what is simulated. ``trackers``: tracker objects besides those of ``cfg.tracking``
    (:mod:`hetfl.results.tracking`); ``group``: the comparison folder the run is one of, for them.
    """
    out = Path(out)
    check_run_out(out, overwrite=overwrite)
    fed = build_federation(cfg)  # first: a data or device error must not touch an earlier run in ``out``
    strategy = fed.strategy()  # likewise for the strategy's parameters
    with lock_out(out):  # one process per run folder, until the run ends
        check_run_out(out, overwrite=overwrite)  # again, now that no other hetfl process can change it
        clear_run(out)
        (out / "config.yaml").write_text(dump_config(cfg))
        if describe and show_progress and console is not None:
            console.print(fed.describe(strategy), highlight=False)
        return Run(cfg, out, fed, strategy, resume=False, trackers=trackers, group=group).execute(show_progress, console)


def resume_experiment(
    out: str | Path, overrides: list[str] | None = None, *, show_progress: bool = True, console: Console | None = None,
    trackers: list[Any] = (),
) -> dict[str, Any]:
    """Continue the run in ``out`` from its last checkpoint, with the config it was started with.

    ``overrides`` may change what does not alter the federation (``rounds``, ``max_sim_time_s``,
    evaluation settings), e.g. to extend a finished run.
    """
    out = Path(out)
    if not (out / "config.yaml").is_file():
        raise HetflError(f"{out}: not a run directory (no config.yaml)")
    if not (out / "checkpoint.pt").is_file():
        raise HetflError(f"{out}: no checkpoint.pt to resume from (checkpoints are written every checkpoint_every rounds)")
    with lock_out(out):  # one process per run folder: a second --resume of it is refused
        before = load_config(out / "config.yaml")
        cfg = load_config(out / "config.yaml", overrides)
        check_resumable_change(before, cfg)
        fed = build_federation(cfg)
        run = Run(cfg, out, fed, fed.strategy(), resume=True, trackers=trackers)  # validated before anything in ``out`` changes
        (out / "config.yaml").write_text(dump_config(cfg))
        return run.execute(show_progress, console)


RESUMABLE = ("rounds", "max_sim_time_s", "checkpoint_every", "threads", "evaluation.", "backend.", "training.state_memory_mb",
             "tracking.", "code.tracking.")


def check_resumable_change(before: ExperimentConfig, after: ExperimentConfig) -> None:
    """Refuse overrides on resume that would change the federation the checkpoint was taken in."""
    old, new = _flatten(before.model_dump(mode="json")), _flatten(after.model_dump(mode="json"))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE):
            raise HetflError(
                f"--set {key}: cannot change when resuming (the checkpoint was made with {old.get(key)!r}); "
                "only rounds, max_sim_time_s, checkpoint_every, threads, evaluation.*, backend.*, tracking.* and "
                "training.state_memory_mb can; start a new run instead"
            )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}
