"""The server's own cost on the simulated clock (``server:``): its compute and its links.

By default the server is free: aggregation, server-side training and evaluation take no simulated time, and
its links carry any number of transfers at the clients' speeds. With ``server.flops`` set, the server's work
takes ``flops / server.flops`` seconds, one piece after another, and a task dispatched while the server still
works starts its download when the work is done:

- aggregation: what the strategy says a commit costs (:meth:`~hetfl.strategies.base.Strategy.server_flops`: by
  default a weighted mean, 2 FLOPs per parameter and update; strategies that train on the server, such as
  stale-update recovery's inversion, add that work);
- evaluation: the forward FLOPs of the global model on the evaluation samples, and of each personal model on
  its client's (charged by the run when it evaluates).

With ``server.up_mbps`` (what the server sends: downloads) and ``server.down_mbps`` (what it receives: uploads)
a transfer runs at the slower of the client's link and the server's share of its own, ``mbps / concurrency``.
With ``server.concurrency`` set, the server serves that many downloads at once and a further download waits for
the first to end (first come, first served); without it every download gets the whole server link, unqueued.
Uploads are capped at the server's share but do not queue: the engine times a task whole when it dispatches it,
before it knows the order in which uploads will reach the server.

Worked example (``tests/test_server_time.py``): server 1e6 FLOP/s; a commit of two updates of a 15-parameter
model costs 2 x 15 x 2 = 60 FLOPs, 60 us, so a task dispatched at the commit starts its download 60 us later.
With ``up_mbps`` 0.0008 (100 B/s) and concurrency 1, two 60-byte downloads dispatched together take 0.6 s each,
the second after the first: it ends at 1.2 s.

This is hetfl's model of a server, not a paper's: issue 18 asks for it so that algorithms with much server work
(per-update aggregation, server-side training) pay for it in time to target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetfl.devices.profiles import TaskTiming

MBPS = 1e6 / 8  # bytes a second in a megabit a second


@dataclass
class ServerTime:
    """When the server's compute and its download slots are next free (checkpointed with the simulator's state).

    Parameters
    ----------
    flops : float or None
        The server's FLOP/s; None: its work takes no time.
    up_Bps, down_Bps : float or None
        Its links in bytes a second, for what it sends and what it receives; None: unlimited.
    concurrency : int or None
        Downloads served at once; None: any number, each with the whole link.
    """

    flops: float | None = None
    up_Bps: float | None = None
    down_Bps: float | None = None
    concurrency: int | None = None
    free_at: float = 0.0  # when the server's compute is next free
    slots: list[float] = field(default_factory=list)  # when each download slot is next free
    busy_s: float = 0.0  # seconds of server work charged so far
    work_flops: float = 0.0  # FLOPs of that work

    def __post_init__(self) -> None:
        if self.concurrency is not None and not self.slots:
            self.slots = [0.0] * self.concurrency

    @classmethod
    def from_config(cls, cfg: Any) -> "ServerTime":
        """From a ``server:`` section (:class:`hetfl.config.ServerConfig`)."""
        mbps = lambda v: None if v is None else v * MBPS  # noqa: E731
        return cls(flops=cfg.flops, up_Bps=mbps(cfg.up_mbps), down_Bps=mbps(cfg.down_mbps), concurrency=cfg.concurrency)

    @property
    def free(self) -> bool:
        """True when the server costs nothing: the engine's timing is the clients' alone."""
        return self.flops is None and self.up_Bps is None and self.down_Bps is None and self.concurrency is None

    def work(self, now: float, flops: float) -> float:
        """Charge ``flops`` of server work that can start at ``now`` (after any work before it); returns when it
        is done."""
        self.work_flops += flops
        if self.flops is None or flops <= 0:
            return max(now, self.free_at)
        seconds = flops / self.flops
        self.free_at = max(now, self.free_at) + seconds
        self.busy_s += seconds
        return self.free_at

    def _share(self, link_Bps: float | None) -> float | None:
        return None if link_Bps is None else link_Bps / (self.concurrency or 1)

    def upload_s(self, client_s: float, bytes_up: int) -> float:
        """Seconds an upload of ``bytes_up`` that the client's own link sends in ``client_s`` takes to this server:
        capped at its share of its receiving link (unqueued)."""
        share = self._share(self.down_Bps)
        return client_s if share is None else max(client_s, bytes_up / share)

    def timing(self, now: float, timing: TaskTiming, bytes_down: int, bytes_up: int) -> TaskTiming:
        """A task dispatched at ``now`` whose client alone would take ``timing``, timed with the server: its
        download starts when the server's compute and a download slot are free and runs at the slower of the two
        links; its upload at the slower of the two. The wait for the server is ``wait_s``. Reserves the slot."""
        if self.free:
            return timing
        start = max(now, self.free_at)
        down_share = self._share(self.up_Bps)
        download = timing.download_s if down_share is None else max(timing.download_s, bytes_down / down_share)
        upload = self.upload_s(timing.upload_s, bytes_up)
        if self.slots:
            slot = min(range(len(self.slots)), key=self.slots.__getitem__)
            start = max(start, self.slots[slot])
            self.slots[slot] = start + download
        return TaskTiming(download, timing.compute_s, upload, wait_s=start - now)
