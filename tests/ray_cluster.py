"""A Ray cluster of separate nodes on this machine, for the multi-node tests and ``benchmarks/ray_nodes.py``.

A head node (``ray start --head``, no CPUs, so that every task goes to a worker node) and ``workers`` worker
nodes (``ray start --address HEAD``, ``cpus`` CPUs each and a custom resource ``hetfl_node_<i>`` of 1, so
that a test can tell the nodes apart). Each node is its own ``ray start --block`` process, the leader of its
own process group with every Ray process of that node, so :meth:`LocalCluster.kill` takes one node down
(SIGKILL to the group: what a machine that dies does) and leaves the others, and other Ray sessions on the
machine, alone.

Network: where the machine allows it (root with CAP_NET_ADMIN, the ``ip`` tool, a bridge), the head is in
this network namespace on a bridge of its own, and every worker node is in a network namespace of its own,
joined to the bridge by a veth pair, with an address of its own (10.x.y.2, .3, ...): the nodes talk over a
network, as on a cluster. Elsewhere every node is on loopback (127.0.0.1), each still a separate raylet, object
store and set of workers. ``LocalCluster.network`` says which.

Every node, and the driver through :func:`driver_env`, gets ``RAY_AUTH_MODE=disabled``: Ray turns token
authentication on for a head when a token file exists in the home folder but not for ``ray start --address`` nor
for a driver whose Ray was imported before, so the cluster does not depend on that file. (A test cluster on a
private bridge or loopback; a real one should use token authentication.)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
_CLUSTERS = itertools.count()
START_TIMEOUT_S = 90.0  # the machine may be shared; a node comes up in a few seconds when idle


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20).returncode == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalCluster:
    """``with LocalCluster(workers=2) as cluster:`` a head and ``workers`` worker nodes; ``cluster.address`` is
    the head's GCS address (``HOST:PORT``) for ``ray.init`` or ``backend.address``; the driver must have
    ``cluster.env`` in its environment (the auth token)."""

    def __init__(self, workers: int = 2, *, cpus: int = 1, object_store_mb: int = 150, netns: bool = True) -> None:
        self.workers, self.cpus, self.object_store = workers, cpus, object_store_mb * 1024 * 1024
        # interface and namespace names of this cluster (15 characters at most): a cluster's may take a moment to go
        self.tag = f"hf{os.getpid() % 100000}{next(_CLUSTERS) % 10}"
        self.tmp = Path(tempfile.mkdtemp(prefix="hfray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.procs: list[subprocess.Popen | None] = []  # the head, then the worker nodes
        self.namespaces: list[str] = []
        self.bridge: str | None = None
        self.network = "loopback"
        self.head_ip = "127.0.0.1"
        self.node_ips: list[str] = []
        self.try_netns = netns

    # ------------------------------------------------------------------ network
    def _netns(self) -> bool:
        """Set up a bridge and one namespace per worker node; False (and nothing left behind) where not allowed."""
        if not (self.try_netns and shutil.which("ip") and os.geteuid() == 0):
            return False
        subnet = f"10.{200 + os.getpid() % 50}.{(os.getpid() + int(self.tag[-1])) % 250}"
        bridge = f"{self.tag}b"
        if not (_run("ip", "link", "add", bridge, "type", "bridge")):
            return False
        self.bridge = bridge
        ok = _run("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge) and _run("ip", "link", "set", bridge, "up")
        for i in range(self.workers):
            ns, host_end, ns_end = f"{self.tag}n{i}", f"{self.tag}v{i}", f"{self.tag}p{i}"
            ok = ok and _run("ip", "netns", "add", ns)
            if ok:
                self.namespaces.append(ns)
            ip = f"{subnet}.{i + 2}"
            ok = ok and all(_run(*c) for c in (
                ("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end),
                ("ip", "link", "set", ns_end, "netns", ns),
                ("ip", "link", "set", host_end, "master", bridge),
                ("ip", "link", "set", host_end, "up"),
                ("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns_end),
                ("ip", "-n", ns, "link", "set", ns_end, "up"),
                ("ip", "-n", ns, "link", "set", "lo", "up"),
            ))
            self.node_ips.append(ip)
        if not ok:
            self._network_down()
            self.node_ips = []
            return False
        self.head_ip, self.network = f"{subnet}.1", "netns"
        return True

    def _network_down(self) -> None:
        for ns in self.namespaces:
            _run("ip", "netns", "del", ns)  # deletes the veth pair with it
        self.namespaces = []
        if self.bridge:
            _run("ip", "link", "del", self.bridge)
            self.bridge = None

    # ------------------------------------------------------------------ nodes
    def _start(self, args: list[str], ns: str | None) -> subprocess.Popen:
        node = len(self.procs)
        # nodes on one machine share, on loopback, the ports: each its own agents' ports
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--object-store-memory={self.object_store}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}", *args]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        log = open(self.tmp / f"node{node}.log", "wb")
        return subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def __enter__(self) -> "LocalCluster":
        try:
            self._netns()
            self.port = free_port(self.head_ip if self.network == "netns" else "127.0.0.1")
            self.address = f"{self.head_ip}:{self.port}"
            self.procs.append(self._start(["--head", f"--node-ip-address={self.head_ip}", f"--port={self.port}",
                                           "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={self.tmp}"], None))
            self._wait_for_head()
            for i in range(self.workers):
                ip = self.node_ips[i] if self.network == "netns" else "127.0.0.1"
                self.procs.append(self._start(
                    [f"--address={self.address}", f"--node-ip-address={ip}", f"--num-cpus={self.cpus}",
                     f"--resources={json.dumps({f'hetfl_node_{i}': 1})}",
                     f"--temp-dir={self.tmp}/n{i}"],  # its own sockets: nodes sharing a folder race for names
                    self.namespaces[i] if self.network == "netns" else None))
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_head(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"the Ray head exited: {self.log(0)}")
            try:
                socket.create_connection((self.head_ip, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"the Ray head did not listen within {START_TIMEOUT_S} s: {self.log(0)}")

    def wait_for_nodes(self, ray, alive: int | None = None) -> None:
        """Wait (bounded) until ``ray`` (connected to this cluster) sees ``alive`` worker nodes (default: all)."""
        want = self.workers if alive is None else alive
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if len(self.node_resources(ray)) == want:
                return
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"Ray node {i} exited: {self.log(i)}")
            time.sleep(0.3)
        raise TimeoutError(f"{want} Ray worker nodes not up within {START_TIMEOUT_S} s")

    @staticmethod
    def node_resources(ray) -> dict[str, str]:
        """The alive worker nodes: their node id -> their ``hetfl_node_<i>`` resource."""
        out = {}
        for node in ray.nodes():
            names = [r for r in node.get("Resources", {}) if r.startswith("hetfl_node_")]
            if node.get("Alive") and names:
                out[node["NodeID"]] = names[0]
        return out

    def kill(self, worker: int) -> None:
        """Take worker node ``worker`` down at once: SIGKILL to every process of that node."""
        proc = self.procs[1 + worker]
        if proc is not None:
            _killpg(proc)
            self.procs[1 + worker] = None

    def log(self, node: int) -> str:
        path = self.tmp / f"node{node}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def close(self) -> None:
        for i in reversed(range(len(self.procs))):
            proc = self.procs[i]
            if proc is not None:
                _killpg(proc)
        self.procs = []
        self._network_down()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()


def _killpg(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (``start_new_session``), then reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def driver_env(cluster: LocalCluster) -> Iterator[None]:
    """This process's environment with the cluster's auth settings (and Ray's cached token reloaded), restored after."""
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    _reload_token()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_token()


def _reload_token() -> None:
    """Ray reads the auth token once per process and caches it: make it read the environment again."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return
    AuthenticationTokenLoader.instance().reset_cache()
