"""The deployment client: joins a hetfl server with its token, trains its own data, sends updates back.

The client half of the algorithm is the strategy's own :meth:`~hetfl.strategies.base.Strategy.client_train`:
the server sends the run's configuration when the client joins, and the client builds the same strategy
class and the same model from it, so there is no second implementation. Its persisted state (SCAFFOLD's
control variate, a personal head) stays in this process between tasks.

It long-polls for work, trains with the task's seed (the simulator's ``task_seed``: the same seed and data
give the same update), sends heartbeats while training, measures its seconds per local step and its
transfer rates and reports them with each update. When the server is unreachable it retries with capped
exponential backoff and jitter, and joins again (same token, same client id) after a server restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# gRPC's C core logs its own errors to stderr; hetfl reports them as one line each (GRPC_VERBOSITY=debug shows them)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
import numpy as np
import torch

from hetfl.config import ExperimentConfig, load_yaml, validate  # load_yaml: the config's YAML reader (1e-3 is a float)
from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy import federation_pb2_grpc as pb_grpc
from hetfl.deploy import wire
from hetfl.deploy.channel import Credentials, tls_problem, open_channel
from hetfl.deploy.tokens import check_client_tls, read_pem, read_token_file
from hetfl.errors import DataError, HetflError
from hetfl.strategies import build_strategy
from hetfl.strategies.base import ClientData, Task, client_report
from hetfl.training import LocalTrainer
from hetfl.compression import compress_upload
from hetfl.training.device import client_half, resolve_device

log = logging.getLogger("hetfl.client")

JOIN_TIMEOUT_S = 30.0
POLL_BACKSTOP_S = 24 * 3600.0  # GetTask's own deadline; a task's download is watched by its TaskBeat instead
WATCH_TICK_S = 0.25  # how often a TaskBeat looks at the transfer under way
ONCE_FAULTS = ("nan-once", "bad-shape-once", "bad-payload-once", "no-payload-once")  # --fault, for tests
VALUE_FAULTS = ("die-on-task", "heartbeat-only-on-task", "plus-255-on-task", "claim-samples", "slow-link")
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}


class Backoff:
    """Capped exponential backoff with full jitter: the n-th wait is uniform in [0, min(cap, base * 2^n)]."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.n = base, cap, 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        wait = self.rng.uniform(0, min(self.cap, self.base * 2**self.n))
        self.n += 1
        return max(wait, 0.05)

    def reset(self) -> None:
        self.n = 0


@dataclass
class ClientOptions:
    server: str
    token: str
    data: str
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    give_up_after_s: float = 600.0
    threads: int | None = None
    attack: tuple[str, float] | None = None  # ("scaled-random", scale): a test of robust aggregation
    faults: list[str] = field(default_factory=list)  # test-only: ONCE_FAULTS and VALUE_FAULTS
    tls_files: tuple[str | None, str | None] = (None, None)  # --tls-cert, --tls-key paths (to diagnose a refusal)
    device: str | None = None  # --device: where this client trains, instead of the server's training.device


def load_data(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's training data: an .npz with arrays ``x`` (samples first) and ``y`` (labels or next tokens)."""
    from hetfl.data.datasets import check_numeric, class_ids, read_npz

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    source = f"--data {path}"
    arrays = read_npz(path, source)  # an empty, truncated or corrupt file, or object arrays: one line
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"--data {path}: expected arrays 'x' and 'y' (found {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"--data {path}: x has shape {x.shape} and y {y.shape}; expected samples first, x (N, ...), y (N,)")
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"--data {path}: x has {len(x)} samples and y {len(y)}; expected the same number, at least one")
    check_numeric(x, source, "x")  # strings, objects, NaN or infinities: one line here, not a diverged run later
    y = class_ids(y, source, "y")  # the server's class ids as they are: integers, non-negative
    x_t = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32) if x.dtype.kind == "b" else x))
    if x_t.is_floating_point():
        x_t = x_t.float()
    return x_t, torch.from_numpy(np.ascontiguousarray(y)).long()


def build_trainer(cfg: ExperimentConfig, setup: dict[str, Any]) -> LocalTrainer:
    """The client's trainer, built as the simulator builds it (:func:`hetfl.engine.run.build_federation`, with
    :func:`~hetfl.engine.run.build_trainer_for`): the same seed, the reference architecture first, then each zoo
    member; this client's architecture is ``setup['architecture']``."""
    from types import SimpleNamespace

    from hetfl.engine.run import build_trainer_for

    data = SimpleNamespace(input_shape=tuple(setup["input_shape"]), n_classes=int(setup["n_classes"]),
                           vocab_size=setup.get("vocab_size"))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    reference, _ = build_trainer_for(cfg.model, cfg, data, count_flops=False)
    if not cfg.model.zoo:
        return reference
    members = [build_trainer_for(arch, cfg, data, key=f"model.zoo.{i}.name", count_flops=False)[0]
               for i, arch in enumerate(cfg.model.zoo)]
    for member in members:
        member.reference = reference
    return members[int(setup["architecture"])]


def server_config(raw: dict[str, Any], server: str) -> ExperimentConfig:
    """The configuration a server sent, validated here: every piece of user code it names (a strategy, model,
    selection of one's own: its ``code`` section) must import on this client and hash as the server's copy, or the
    client refuses to join, in one line (:func:`hetfl.config.validate` checks the hashes)."""
    try:
        return validate(raw, source="the server's configuration")
    except HetflError as err:
        changed = _changed_code(raw)
        if changed is not None:
            raise HetflError(f"this client cannot join the run at {server}: {changed}") from None
        raise HetflError(f"this client cannot join the run at {server}: {err}") from None


def _changed_code(raw: dict[str, Any]) -> str | None:
    """What of the server's code this client has another version of, if that is why ``raw`` did not validate."""
    pins = raw.get("code")
    if not isinstance(pins, dict) or not pins:
        return None
    try:
        own = validate({**raw, "code": {}}, source="the server's configuration").code  # this client's code, as found
    except HetflError:
        return None  # something else is wrong: the caller says what
    for key, pin in pins.items():
        mine = own.get(key)
        theirs = pin.get("sha256") if isinstance(pin, dict) else None
        if mine is not None and theirs and mine.sha256 != theirs:
            return (
                f"its {key} {mine.path} differs from the server's: {mine.file} has SHA-256 {(mine.sha256 or 'none')[:12]}, "
                f"the server's ({pin.get('file')}) {theirs[:12]}; install the server's version of that code here"
            )
    return None


class Client:
    def __init__(self, options: ClientOptions) -> None:
        self.o = options
        self.x, self.y = load_data(options.data)
        self.session: str | None = None
        self.client_id: int | None = None
        self.config_yaml: str | None = None
        self.cfg: ExperimentConfig | None = None
        self.setup: dict[str, Any] = {}
        self.trainer: LocalTrainer | None = None
        self.strategy: Any = None
        self.state: dict[str, Any] = {}  # the strategy's per-client state, kept between tasks
        self.tasks_seen = 0
        self.upload_Bps = 0.0
        self._beat: TaskBeat | None = None  # the task whose header arrived: heartbeats until its upload is done
        self._cohorts: dict[int, tuple[dict[int, bytes], int]] = {}  # secure aggregation: round -> (peers, numel)
        from hetfl.deploy.secagg import MaskingClient

        self.masking = MaskingClient()  # its public key goes with every join; used if the server aggregates securely
        self.token = options.token
        self.instance = secrets.token_hex(16)  # this process: a rejoin of its own may replace its live session
        self.channel = grpc.intercept_channel(self._channel(), Credentials(self))  # token/session on every call
        self.stub = pb_grpc.FederationStub(self.channel)

    def _channel(self) -> grpc.Channel:
        o = self.o
        return open_channel(o.server, o.tls_ca, o.tls_key, o.tls_cert)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        backoff = Backoff()
        unreachable_since: float | None = None
        in_use_since: float | None = None
        while True:
            try:
                if self.session is None:
                    self._join()
                    in_use_since = None
                header, tensors, download_s, download_bytes = self._poll()
                unreachable_since = None
                backoff.reset()
                if header.kind == pb.TaskHeader.FINISHED:
                    log.info("client %s: the server ended the run (%s)", self.client_id, header.message or "done")
                    return 0
                if header.kind == pb.TaskHeader.TRAIN:
                    self._train_and_send(header, tensors, download_s, download_bytes)
                elif header.kind == pb.TaskHeader.UNMASK:
                    self._send_share(header)
            except grpc.RpcError as err:
                code = err.code()
                detail = err.details() or code.name
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise HetflError(f"the server at {self.o.server} refused this client: {detail}") from None
                if code == grpc.StatusCode.FAILED_PRECONDITION and "run is over" in detail:
                    log.info("client %s: %s", self.client_id, detail)
                    return 0
                if code == grpc.StatusCode.NOT_FOUND:
                    log.info("client %s: %s", self.client_id, detail)
                    self.session = None
                    continue
                now = time.monotonic()
                if code == grpc.StatusCode.ALREADY_EXISTS:  # another process holds this token's session (or our old one)
                    in_use_since = in_use_since or now
                    if now - in_use_since > self.o.give_up_after_s:
                        raise HetflError(f"the server at {self.o.server} refuses this client's token for "
                                         f"{now - in_use_since:.0f} s: {detail}") from None
                    wait = backoff.next()
                    log.warning("client %s: the server refused the join (%s); retrying in %.1f s",
                                self.client_id if self.client_id is not None else "?", detail, wait)
                    time.sleep(wait)
                    continue
                if code == grpc.StatusCode.UNAVAILABLE:  # a TLS mistake is no outage: say so now, not after give-up-after
                    problem = tls_problem(detail, self.o.server, self.o.tls_ca, *self.o.tls_files)
                    if problem is not None:
                        raise HetflError(problem) from None
                if code not in TRANSIENT:
                    raise HetflError(f"the server at {self.o.server} answered {code.name}: {detail}") from None
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.o.give_up_after_s:
                    raise HetflError(
                        f"cannot reach the hetfl server at {self.o.server} for {now - unreachable_since:.0f} s "
                        f"({detail}); check the address, that the server runs, and whether it requires TLS (--tls-ca)"
                    ) from None
                wait = backoff.next()
                log.warning("client %s: server %s unreachable (%s); retrying in %.1f s",
                            self.client_id if self.client_id is not None else "?", self.o.server, detail, wait)
                time.sleep(wait)

    def _join(self) -> None:
        device = pb.DeviceReport(
            n_samples=self._claimed_samples(), hostname=socket.gethostname(), public_key=self.masking.public_key,
        )
        if self.cfg is not None:  # the label statistics need the config's class count
            device.stats_json = json.dumps(client_report(ClientData(0, self.x, self.y), self.setup["n_classes"]))
        # the token travels in the call's metadata (channel.Credentials), which the server checks before the request
        reply = self.stub.Join(pb.JoinRequest(device=device), timeout=JOIN_TIMEOUT_S)
        self.session, self.client_id = reply.session, reply.client_id
        if reply.config_yaml != self.config_yaml:
            self._configure(reply)
        log.info("client %d joined %s (%d samples)", self.client_id, self.o.server, len(self.x))

    def _configure(self, reply: pb.JoinReply) -> None:
        raw = load_yaml(reply.config_yaml)
        self.cfg = server_config(raw if isinstance(raw, dict) else {}, self.o.server)
        self.config_yaml = reply.config_yaml
        self.setup = json.loads(reply.setup_json)
        shape = tuple(self.setup["input_shape"])
        if tuple(self.x.shape[1:]) != shape:
            raise DataError(f"--data {self.o.data}: samples of shape {tuple(self.x.shape[1:])}; the server's model takes {shape}")
        if int(self.y.max()) >= int(self.setup["n_classes"]) or int(self.y.min()) < 0:
            raise DataError(f"--data {self.o.data}: labels outside 0..{self.setup['n_classes'] - 1}")
        if self.o.device is not None:
            self.cfg.training.device = self.o.device  # this machine's device, not the server's
        self.strategy = build_strategy(self.cfg.strategy, self.cfg.training, self.cfg.model)
        self.trainer = build_trainer(self.cfg, self.setup)
        self.x, self.y = self.x.to(self.trainer.device), self.y.to(self.trainer.device)  # once, for every task
        if self.o.threads:
            torch.set_num_threads(self.o.threads)
        # the first optimiser step imports much of torch (seconds): pay it now, not inside the first task,
        # and measure the seconds a local step takes on this machine
        self.trainer.train(self.trainer.initial, self.x, self.y, steps=1, seed=0)
        started = time.monotonic()
        self.trainer.train(self.trainer.initial, self.x, self.y, steps=5, seed=0)
        log.info("client %d: ready, %.4f s per local step", self.client_id, (time.monotonic() - started) / 5)

    def _poll(self) -> tuple[pb.TaskHeader, dict[str, torch.Tensor], float, int]:
        """Ask for work; a task's stream. From its header on, a :class:`TaskBeat` heartbeats for the task (its download,
        training and upload) and gives the download up if it outlasts its bytes at ``deploy.min_transfer_Bps``."""
        # the server answers within poll_s (a timer gives up on it after the server's own deadline for a poll); a
        # task's download is then watched by its TaskBeat, its deadline growing with its bytes: the call's own
        # deadline is only a backstop
        stream = self.stub.GetTask(pb.TaskRequest(session=self.session), timeout=POLL_BACKSTOP_S)
        answer = threading.Timer(self._transfer_s(0, poll=True) if self.cfg is not None else 600.0, stream.cancel)
        answer.daemon = True
        answer.start()
        try:
            first = next(stream)
        finally:
            answer.cancel()
        started = time.monotonic()
        header = first.task
        beat = None
        if header.kind == pb.TaskHeader.TRAIN:
            beat = self._beat = TaskBeat(self, int(header.task_id))
            beat.watch(stream, self._transfer_s(sum(int(t.nbytes) for t in header.tensors), poll=True))
        try:
            tensors, _, nbytes = wire.collect(header.tensors, self._throttled(stream))
        except BaseException:
            if beat is not None:
                beat.close()
                self._beat = None
            raise
        if beat is not None:
            beat.watch(None, None)
        return header, tensors, time.monotonic() - started, nbytes

    def _transfer_s(self, nbytes: int, *, poll: bool = False) -> float:
        """Seconds a transfer of ``nbytes`` may take: the server's own deadline for it (its gate's: call_timeout_s,
        plus poll_s for a task's download, plus the bytes at min_transfer_Bps) and a few seconds."""
        d = self.cfg.deploy
        base = getattr(d, "call_timeout_s", 60.0) + (d.poll_s if poll else 0.0)
        return base + nbytes / getattr(d, "min_transfer_Bps", 10_000.0) + 5.0

    # ------------------------------------------------------------------ one task
    def _train_and_send(self, header: pb.TaskHeader, tensors: dict[str, torch.Tensor], download_s: float, nbytes: int) -> None:
        beat, self._beat = self._beat or TaskBeat(self, int(header.task_id)), None  # since the header, to the upload's end
        try:
            self.tasks_seen += 1
            self._maybe_die()
            options = json.loads(header.options_json or "{}")
            options.update({k.removeprefix("option:"): v for k, v in tensors.items() if k.startswith("option:")})
            task = Task(
                task_id=int(header.task_id), client_id=int(self.client_id), version=int(header.version),
                params=tensors["params"], steps=int(header.steps), dispatched_at=0.0,
                payload={k.removeprefix("payload:"): v for k, v in tensors.items() if k.startswith("payload:")},
                options=options,
            )
            self._send_result(header, task, ClientData(self.client_id, self.x, self.y), download_s, nbytes, beat)
        finally:
            beat.close()

    def _send_result(self, header: pb.TaskHeader, task: Task, data: ClientData, download_s: float, nbytes: int,
                     beat: "TaskBeat") -> None:
        if self._heartbeat_only():
            return
        started = time.monotonic()
        result = client_half(self.strategy, self.trainer, task, data, self.state, int(header.seed))
        result = compress_upload(self.strategy, task, result, self.state, int(header.seed))  # strategy.compression
        train_s = time.monotonic() - started
        if not beat.wanted.is_set():
            log.info("client %d: task %d no longer wanted by the server; result dropped", self.client_id, task.task_id)
            return
        params = self._tamper(result.params, task)
        payload = self._tamper_payload(result.payload)
        steps = self.strategy.compute_steps(result.steps)
        upd = pb.UpdateHeader(
            session=self.session, task_id=task.task_id, n_samples=self._claimed_samples(), steps=int(result.steps),
            loss=float(result.loss), stats_json=json.dumps({**client_report(data, self.setup["n_classes"]), **result.stats}),
            train_s=train_s, step_s=train_s / max(steps, 1), download_s=download_s, download_bytes=nbytes,
            upload_Bps=self.upload_Bps,
        )
        blobs = []
        if header.secagg_json:
            specs, blobs = self._masked(json.loads(header.secagg_json), task, params, len(self.x))
        else:
            method = self.cfg.deploy.compression
            specs = []
            if method == "topk" and params.shape == task.params.shape:
                spec, blob = wire.encode_tensor("params", params - task.params, "topk",
                                                topk_ratio=self.cfg.deploy.topk_ratio, extra={"delta": True})
            else:
                spec, blob = wire.encode_tensor("params", params, method if method != "topk" else "none")
            specs.append(spec)
            blobs.append(blob)
            for name, t in payload.items():
                spec, blob = wire.encode_tensor(f"payload:{name}", t)
                specs.append(spec)
                blobs.append(blob)
        upd.tensors.extend(specs)
        sent = time.monotonic()
        stream = self._throttled(wire.chunks(pb.Chunk(update=upd), blobs, int(self.setup["chunk_bytes"])))
        ack = self.stub.SendUpdate(stream, timeout=self._transfer_s(sum(len(b) for b in blobs)))  # grows with the bytes
        elapsed = time.monotonic() - sent
        self.upload_Bps = sum(len(b) for b in blobs) / elapsed if elapsed > 0 else 0.0
        if ack.accepted:
            log.info("client %d: task %d (version %d, %d steps, loss %.4f) trained in %.2f s; update accepted",
                     self.client_id, task.task_id, task.version, result.steps, result.loss, train_s)
        else:
            log.warning("client %d: task %d update rejected by the server: %s", self.client_id, task.task_id, ack.reason)

    # ------------------------------------------------------------------ secure aggregation
    def _masked(self, secagg: dict, task: Task, params: torch.Tensor, n: int) -> tuple[list, list]:
        n = int(secagg.get("weights", {}).get(str(self.client_id), n))  # the weight the server gives it, which it divides by
        peers = {int(k): bytes.fromhex(v) for k, v in secagg["peers"].items()}
        vector = (n * (params - task.params)).double().numpy()
        masked = self.masking.mask(vector, peers, self.client_id, int(secagg["round"]),
                                   clip=float(secagg["clip"]), scale=float(secagg["scale"]))
        spec, blob = wire.encode_tensor("params", torch.from_numpy(masked.view(np.int32).copy()))
        self._cohorts[int(secagg["round"])] = (peers, vector.size)
        return [spec], [blob]

    def _send_share(self, header: pb.TaskHeader) -> None:
        request = json.loads(header.secagg_json)
        round_id = int(request["round"])
        peers, numel = self._cohorts.pop(round_id, (None, 0))
        if peers is None:
            log.warning("client %d: asked to unmask round %d, which it did not take part in", self.client_id, round_id)
            return
        share = self.masking.unmask_share([int(d) for d in request["dropped"]], peers, self.client_id, round_id, numel)
        spec, blob = wire.encode_tensor("share", torch.from_numpy(share.view(np.int32).copy()))
        upd = pb.UpdateHeader(session=self.session, task_id=int(header.task_id), unmask_share=True,
                              stats_json=json.dumps({"dropped": request["dropped"]}))
        upd.tensors.append(spec)
        ack = self.stub.SendUpdate(wire.chunks(pb.Chunk(update=upd), [blob], int(self.setup["chunk_bytes"])), timeout=600)
        log.info("client %d: revealed its masks with dropped %s for round %d (%s)", self.client_id, request["dropped"],
                 round_id, "accepted" if ack.accepted else ack.reason)

    # ------------------------------------------------------------------ attacks and faults (tests)
    def _tamper(self, params: torch.Tensor, task: Task) -> torch.Tensor:
        if self.o.attack is not None:
            kind, scale = self.o.attack
            gen = torch.Generator().manual_seed(task.task_id)
            params = task.params + scale * torch.randn(task.params.shape, generator=gen)
        if "nan-once" in self.o.faults:
            self.o.faults.remove("nan-once")
            params = params.clone()
            params[: max(1, params.numel() // 100)] = float("nan")
        elif "bad-shape-once" in self.o.faults:
            self.o.faults.remove("bad-shape-once")
            params = params[:-10].clone()
        plus = self._fault_value("plus-255-on-task")
        if plus is not None and self.tasks_seen == int(plus):
            log.warning("client %s: sending its start model + 255 everywhere (fault plus-255-on-task:%s)", self.client_id, plus)
            params = task.params + 255.0
        return params

    def _tamper_payload(self, payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "bad-payload-once" in self.o.faults and payload:
            self.o.faults.remove("bad-payload-once")
            name = sorted(payload)[0]
            payload = {**payload, name: torch.zeros(7)}  # SCAFFOLD's delta_c of shape (7,)
        elif "no-payload-once" in self.o.faults and payload:
            self.o.faults.remove("no-payload-once")
            payload = {}
        return payload

    def _fault_value(self, kind: str) -> str | None:
        for fault in self.o.faults:
            if fault.startswith(kind + ":"):
                return fault.split(":", 1)[1]
        return None

    def _claimed_samples(self) -> int:
        claim = self._fault_value("claim-samples")
        return int(float(claim)) if claim is not None else len(self.x)

    def _heartbeat_only(self) -> bool:
        """Fault heartbeat-only-on-task:N: on its N-th task, take it and only heartbeat (at most 5 minutes)."""
        on = self._fault_value("heartbeat-only-on-task")
        if on is None or self.tasks_seen != int(on):
            return False
        log.warning("client %s: only heartbeating for its task (fault heartbeat-only-on-task:%s)", self.client_id, on)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.5)
        return True

    def _throttled(self, chunks):
        """Fault slow-link:BYTES_PER_S: a link of that rate, each chunk taking its bytes' time (both directions)."""
        rate = self._fault_value("slow-link")
        for chunk in chunks:
            if rate is not None:
                time.sleep(len(chunk.data) / float(rate))
            yield chunk

    def _maybe_die(self) -> None:
        for fault in self.o.faults:
            if fault.startswith("die-on-task:") and self.tasks_seen == int(fault.split(":")[1]):
                log.warning("client %s: dying mid-task (fault %s)", self.client_id, fault)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)


class TaskBeat:
    """One task's heartbeats, from its header's arrival to its upload's end, in a thread of its own: a client on a
    slow link is alive to the server while it downloads and uploads, not only while it trains (a chunk may take
    longer than ``deploy.heartbeat_timeout_s`` to cross the link). It also holds the deadline of the download under
    way (:meth:`watch`: the server's own for it, which grows with the bytes at ``deploy.min_transfer_Bps``) and
    cancels a download past it. ``wanted`` is cleared when the server says it no longer wants the task."""

    def __init__(self, client: "Client", task_id: int) -> None:
        self.client, self.task_id = client, task_id
        self.interval = float(client.setup.get("heartbeat_s", 5.0))
        self.wanted = threading.Event()
        self.wanted.set()
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"hetfl-beat-{task_id}", daemon=True)
        self._thread.start()

    def watch(self, call: Any, seconds: float | None) -> None:
        """Cancel ``call`` (a transfer) if it is still going ``seconds`` from now; ``watch(None, None)``: nothing to watch."""
        with self._lock:
            self._call = call
            self._deadline = time.monotonic() + seconds if call is not None and seconds is not None else None

    def close(self) -> None:
        self.done.set()

    def _run(self) -> None:
        next_beat = time.monotonic() + self.interval
        while not self.done.wait(min(WATCH_TICK_S, self.interval)):
            now = time.monotonic()
            with self._lock:
                call, deadline = self._call, self._deadline
            if call is not None and deadline is not None and now > deadline:
                log.warning("client %s: task %d's download is too slow (past its deadline): given up",
                            self.client.client_id, self.task_id)
                self.watch(None, None)
                call.cancel()
            if now >= next_beat:
                next_beat = now + self.interval
                try:
                    reply = self.client.stub.Heartbeat(
                        pb.HeartbeatRequest(session=self.client.session, task_id=self.task_id), timeout=self.interval * 2)
                    if not reply.task_wanted:
                        self.wanted.clear()
                except grpc.RpcError:
                    pass  # the transfer or the upload will find out whether the server is there


# ---------------------------------------------------------------------------- the command
def parse_attack(text: str | None) -> tuple[str, float] | None:
    if text is None:
        return None
    kind, _, scale = text.partition(":")
    try:
        value = float(scale)
    except ValueError:
        value = -1.0
    if kind != "scaled-random" or not value > 0:
        raise HetflError(f"--attack {text}: expected scaled-random:SCALE with SCALE > 0, e.g. scaled-random:10")
    return kind, value


def client_command(
    *, server: str, token: str | None, token_file: str | None, data: str, tls_ca: str | None = None,
    tls_cert: str | None = None, tls_key: str | None = None, give_up_after_s: float = 600.0,
    threads: int | None = None, attack: str | None = None, faults: list[str] | None = None, quiet: bool = False,
    device: str | None = None,
) -> int:
    """``hetfl client``: join ``server`` and train until the run is over."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if (token is None) == (token_file is None):
        raise HetflError("give the client's token with --token TOKEN or --token-file FILE (one of them)")
    if token_file is not None:
        token = read_token_file(token_file)
    if ":" not in server or not server.rsplit(":", 1)[1].isdigit() or not 0 < int(server.rsplit(":", 1)[1]) <= 65535:
        raise HetflError(f"--server {server}: expected HOST:PORT with a port in 1..65535, e.g. 192.168.1.10:50051")
    if device is not None:
        device = str(resolve_device(device, key="--device"))  # a device this machine lacks: one line, before joining
    if (tls_cert is None) != (tls_key is None):
        raise HetflError("--tls-cert and --tls-key go together (this client's certificate and private key, for mutual TLS)")
    if tls_cert is not None and tls_ca is None:
        raise HetflError("--tls-cert needs --tls-ca (the certificate authority that signed the server's certificate)")
    options = ClientOptions(
        server=server, token=token, data=data, tls_ca=read_pem(tls_ca, "--tls-ca"), tls_cert=read_pem(tls_cert, "--tls-cert"),
        tls_key=read_pem(tls_key, "--tls-key"), give_up_after_s=give_up_after_s, threads=threads,
        attack=parse_attack(attack), faults=list(faults or []), tls_files=(tls_cert, tls_key), device=device,
    )
    check_client_tls(tls_ca, tls_cert, tls_key)  # a file that is no certificate, a key not the certificate's: one line
    for fault in options.faults:
        kind, _, value = fault.partition(":")
        numeric = value.replace(".", "", 1).replace("e", "", 1).isdigit()
        if not (fault in ONCE_FAULTS or (kind in VALUE_FAULTS and numeric)):
            raise HetflError(f"--fault {fault}: unknown ({', '.join(ONCE_FAULTS)}, "
                             f"{', '.join(k + ':N' for k in VALUE_FAULTS)})")
    client = Client(options)
    try:
        return client.run()
    finally:
        client.channel.close()
