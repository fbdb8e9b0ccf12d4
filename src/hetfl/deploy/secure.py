"""Secure aggregation on the deployment server: cohorts of pairwise-masked updates (:mod:`hetfl.deploy.secagg`).

A *cohort* is the tasks the strategy dispatched in one engine step at one model version (a FedAvg round).
Their streams are held back until the step ends, then each carries the cohort's members and public keys,
and its client sends ``mask(n_k * (w_k - w))`` instead of its model. The server adds the masked vectors;
when a member fails, the survivors are asked (an ``UNMASK`` message on their next poll) for the masks they
share with it. Once the cohort is complete, the strategy receives, for every survivor, an update whose model
is ``w + sum_k n_k (w_k - w) / sum_k n_k`` with the survivor's ``n_k``: a weighted mean of these is exactly
the secure mean, and no single client's model is ever seen. Only strategies whose aggregation is such a
weighted mean (``Strategy.linear_aggregation``: FedAvg, FedProx) accept this; the server refuses others.

If a survivor fails before it revealed its shares, the cohort cannot be decoded: every survivor's task is
reported failed and the round goes on without them (Bonawitz et al. recover with secret sharing, which
:mod:`hetfl.deploy.secagg` leaves out).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hetfl.deploy import federation_pb2 as pb
from hetfl.deploy.secagg import SecureCohort
from hetfl.strategies.base import Task

if TYPE_CHECKING:
    from hetfl.deploy.engine import DeployServer

log = logging.getLogger("hetfl.server")


@dataclass
class Cohort:
    round_id: int
    tasks: dict[int, Task]  # member client -> its task
    masks: SecureCohort
    arrived: dict[int, int] = field(default_factory=dict)  # survivor -> n_k
    reported: dict[int, tuple[int, float]] = field(default_factory=dict)  # survivor -> (steps, loss) it reported
    asked: set[int] = field(default_factory=set)  # survivors asked for shares


class SecureRounds:
    def __init__(self, server: "DeployServer") -> None:
        self.s = server
        self.pending: list[Task] = []  # dispatched in this engine step, not yet sent
        self.cohorts: dict[int, Cohort] = {}  # round id -> cohort
        self.of_client: dict[int, int] = {}  # member client -> its cohort's round id
        self.next_round = 0

    def join_cohort(self, task: Task) -> None:
        """Hold ``task`` until the engine step ends (:meth:`seal`); its stream is written then."""
        self.pending.append(task)

    def seal(self) -> list[tuple[Task, dict[str, Any]]]:
        """Form one cohort per model version from the tasks held back; each task with its secure-aggregation header."""
        tasks, self.pending = self.pending, []
        out = []
        for version in sorted({t.version for t in tasks}):
            members = [t for t in tasks if t.version == version and self.s.state.busy.get(t.client_id) is t]
            if not members:
                continue
            d = self.s.deploy
            round_id = self.next_round
            self.next_round += 1
            masks = SecureCohort([t.client_id for t in members], members[0].params.numel(), scale=d.secagg_scale, clip=d.secagg_clip)
            cohort = Cohort(round_id, {t.client_id: t for t in members}, masks)
            self.cohorts[round_id] = cohort
            with self.s.lock:
                keys = {t.client_id: self.s.conns[t.client_id].public_key.hex() for t in members}
            if len(members) == 1:
                log.warning("secure aggregation: round %d has one member (client %d): its update is its own sum",
                            round_id, members[0].client_id)
            # each member's weight n_k as the server bounds it (DeployServer.num_samples): the client masks n_k * delta
            # with it, so the decoded sum divided by sum n_k is the mean whatever count a client claimed
            weights = {str(t.client_id): self.s.num_samples(t.client_id) for t in members}
            header = {"round": round_id, "peers": keys, "clip": d.secagg_clip, "scale": d.secagg_scale, "weights": weights}
            for t in members:
                self.of_client[t.client_id] = round_id
                out.append((t, header))
        return out

    # ------------------------------------------------------------------ arrivals and failures
    def on_masked(self, task: Task, header: pb.UpdateHeader, params: torch.Tensor | None) -> tuple[bool, str]:
        cohort = self.cohorts.get(self.of_client.get(task.client_id, -1))
        if cohort is None or cohort.tasks.get(task.client_id) is not task:
            self.s.reject(task, "a masked update outside any open secure-aggregation round")
            return False, "no open secure-aggregation round for this task"
        if task.client_id in cohort.arrived:  # sent twice: the cohort already holds it (adding it again would raise)
            return False, "this task's masked update has already arrived"
        numel = cohort.masks.numel
        if params is None or params.dtype != torch.int32 or params.shape != (numel,):
            got = "nothing" if params is None else f"{str(params.dtype).removeprefix('torch.')} {tuple(params.shape)}"
            reason = f"masked update: {got} != expected int32 ({numel},)"
            self.s.reject(task, reason)
            return False, reason
        cohort.masks.add(task.client_id, params.numpy().view(np.uint32))
        cohort.arrived[task.client_id] = self.s.num_samples(task.client_id)
        cohort.reported[task.client_id] = (int(header.steps), float(header.loss))
        with self.s.lock:
            self.s.handed_out.discard(task.task_id)  # delivered: its client may poll while the round completes
        self._progress(cohort)
        return True, ""

    def failed(self, task: Task) -> None:
        """A member's task is lost (timed out, cancelled, rejected): before it masked, the cohort goes on without it."""
        round_id = self.of_client.get(task.client_id)
        cohort = self.cohorts.get(round_id) if round_id is not None else None
        if cohort is None or cohort.tasks.get(task.client_id) is not task:
            return
        del self.of_client[task.client_id]
        if task.client_id in cohort.arrived:  # a survivor lost before it revealed its shares: undecodable
            self._abandon(cohort, f"survivor {task.client_id} was lost before the round could be unmasked")
            return
        cohort.masks.fail(task.client_id)
        self._progress(cohort)

    def on_share(self, client: int, header: pb.UpdateHeader, tensors: dict[str, torch.Tensor]) -> tuple[bool, str]:
        round_id = self.of_client.get(client)
        cohort = self.cohorts.get(round_id) if round_id is not None else None
        share = tensors.get("share")
        if cohort is None or client not in cohort.asked or share is None:
            return False, "no share was asked of this client"
        try:
            dropped = [int(d) for d in json.loads(header.stats_json or "{}").get("dropped", [])]
            cohort.masks.add_share(client, share.numpy().view(np.uint32), dropped)
        except (ValueError, TypeError, AttributeError) as err:
            self._abandon(cohort, f"client {client} sent an unusable share ({err})")
            return False, str(err)
        cohort.asked.discard(client)
        self._progress(cohort)
        return True, ""

    # ------------------------------------------------------------------ completion
    def _progress(self, cohort: Cohort) -> None:
        failed = cohort.masks.failed
        if any(c not in cohort.arrived and c not in failed for c in cohort.tasks):
            return  # members still training
        for survivor, dropped in cohort.masks.needs_shares().items():
            if survivor not in cohort.asked:
                cohort.asked.add(survivor)
                task = cohort.tasks[survivor]
                header = pb.TaskHeader(kind=pb.TaskHeader.UNMASK, task_id=task.task_id,
                                       secagg_json=json.dumps({"round": cohort.round_id, "dropped": dropped}))
                self.s.send_control(survivor, header)
                log.info("secure aggregation round %d: client %d asked to reveal its masks with %s",
                         cohort.round_id, survivor, dropped)
        if not cohort.masks.complete:
            return
        del self.cohorts[cohort.round_id]
        survivors = sorted(cohort.arrived)
        for c in survivors:
            self.of_client.pop(c, None)
        if not survivors:
            return
        total = torch.from_numpy(cohort.masks.total())
        mean_delta = (total / sum(cohort.arrived.values())).to(torch.float32)
        start = cohort.tasks[survivors[0]].params
        params = start + mean_delta
        log.info("secure aggregation round %d: sum of %d masked update(s) decoded (%d failed)",
                 cohort.round_id, len(survivors), len(cohort.masks.failed))
        s = self.s
        for c in survivors:
            task = cohort.tasks[c]
            if s.state.busy.get(c) is not task:
                continue
            s._forget(task)
            steps, loss = cohort.reported[c]
            update = s.core.make_update(task, params, n_samples=cohort.arrived[c], steps=steps, loss=loss,
                                        stats=dict(s.state.client_stats.get(c, {})))
            s._deliver(update)  # on_update, guarded: a strategy's failure rejects this update only

    def _abandon(self, cohort: Cohort, reason: str) -> None:
        log.warning("secure aggregation round %d discarded: %s", cohort.round_id, reason)
        self.cohorts.pop(cohort.round_id, None)
        for c, task in cohort.tasks.items():
            self.of_client.pop(c, None)
            if self.s.state.busy.get(c) is task:
                self.s.fail(task, f"secure aggregation round {cohort.round_id} discarded")
