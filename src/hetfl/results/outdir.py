"""What ``--out`` may name, so that writing results never destroys data.

``hetfl run``, ``hetfl compare`` and ``hetfl server`` write into a folder. hetfl writes only into:

- a folder that does not exist yet, or an empty one;
- a folder holding a hetfl run (``config.yaml`` beside ``metrics.jsonl``, ``summary.json`` or
  ``checkpoint.pt``), and only when asked to replace it (``--overwrite``; ``hetfl server`` resumes
  from its checkpoint instead, or starts anew with ``--fresh``); then only hetfl's own files there
  (:data:`RUN_FILES`, the report's images and page, its row in the run index) are replaced, and any
  other file stays;
- for ``hetfl compare``, a folder holding an earlier comparison (its ``comparison.json``), likewise only
  with ``--overwrite``; the runs that comparison made (the algorithms its ``comparison.json`` lists, or with
  several seeds the run folders, ``ALGORITHM-seedK``, it lists) are replaced or, if not compared again, their
  files removed. A folder of other runs (a results root) is
  never a comparison's.

Everything else is refused before anything is written, with one line saying why: a non-empty folder
that is not hetfl's (it may hold a ``config.yaml`` of the user's), a file, the root of the file
system, the home folder and the current folder itself.

One process at a time: while a command writes into a folder it holds an exclusive lock on the file
:data:`LOCK_NAME` in it (:func:`lock_out`, an ``fcntl.flock`` the system releases when the process ends,
however it ends). A second ``hetfl run``, ``hetfl compare`` or ``hetfl server`` on that folder is refused in one
line naming the process that holds it. The lock file goes when its process is done (one left by a process that
was killed holds no lock) and is no run file: a folder holding only it is empty.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hetfl.errors import HetflError
from hetfl.results.index import INDEX_NAME, forget_run
from hetfl.results.metrics import CONFIG_NAME, METRICS_NAME, SUMMARY_NAME
from hetfl.results.report import (
    FORMATS, IMAGES, LOSS_IMAGE, PARTICIPATION_IMAGE, PERPLEXITY_IMAGE, REPORT_NAME, STALENESS_IMAGE,
)

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".hetfl.lock"
"""The lock file of a folder a hetfl process writes into (:func:`lock_out`)."""
COMPARISON_NAME = "comparison.json"
SWEEP_NAME = "sweep.json"
"""An algorithm's sweep record (:mod:`hetfl.sweep`), beside its trials' runs."""
RUN_FILES = (
    CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, CHECKPOINT_NAME, CHECKPOINT_NAME + ".tmp",
    "devices.json", "server.log",  # hetfl server's
)
"""The files a run writes into its folder (besides the report's)."""
_FIGURES = (*IMAGES, STALENESS_IMAGE[0], PERPLEXITY_IMAGE[0], PARTICIPATION_IMAGE[0], LOSS_IMAGE[0])
REPORT_FILES = (REPORT_NAME, *(f"{Path(image).stem}.{fmt}" for image in _FIGURES for fmt in FORMATS))
"""The files ``hetfl report`` writes into the folder it reports on (each figure in every ``--format``)."""
_RUN_MARKERS = (METRICS_NAME, SUMMARY_NAME, CHECKPOINT_NAME)  # with config.yaml: a run (config.yaml alone may be the user's)


@dataclass(frozen=True)
class OutDir:
    """What a folder named by ``--out`` holds.

    Attributes
    ----------
    path : Path
        The folder, as given.
    kind : str
        ``new`` (does not exist), ``empty``, ``run`` (a hetfl run), ``comparison`` (what ``hetfl compare`` wrote:
        ``comparison.json`` beside its runs), ``sweep`` (an algorithm's ``hetfl sweep``: ``sweep.json`` beside its
        runs), ``runs`` (a folder of runs or a run index: a results root, or a
        comparison that ended before its ``comparison.json``) or ``other`` (anything else: not hetfl's).
    detail : str
        For messages: the run's status, algorithm and rounds; the runs in it; a few of the other files.
    runs : tuple of str
        The run folders directly in it.
    """

    path: Path
    kind: str
    detail: str = ""
    status: str | None = None  # a run's: its summary's status, or "unfinished" without one
    runs: tuple[str, ...] = ()

    @property
    def checkpoint(self) -> bool:
        """Whether a run folder holds a checkpoint to resume from."""
        return self.kind == "run" and (self.path / CHECKPOINT_NAME).is_file()


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a hetfl run: ``config.yaml`` and what a run writes after it."""
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and any((folder / name).is_file() for name in _RUN_MARKERS)


def inspect(path: str | Path) -> OutDir:
    """What ``path`` holds (:class:`OutDir`); a HetflError for a file."""
    path = Path(path)
    if not path.exists():
        return OutDir(path, "new")
    if not path.is_dir():
        raise HetflError(f"--out {path}: exists and is not a folder")
    entries = sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_NAME)
    if not entries:
        return OutDir(path, "empty")
    if is_run(path):
        return OutDir(path, "run", *_describe_run(path))
    runs = tuple(sorted(name for name in entries if (path / name).is_dir() and is_run(path / name)))
    detail = f"runs {', '.join(runs)}" if runs else "a run index"
    if COMPARISON_NAME in entries:
        return OutDir(path, "comparison", detail, runs=runs)
    if SWEEP_NAME in entries:
        return OutDir(path, "sweep", detail, runs=runs)
    if runs or INDEX_NAME in entries:
        return OutDir(path, "runs", detail, runs=runs)
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    return OutDir(path, "other", shown)


def _describe_run(folder: Path) -> tuple[str, str]:
    """(``a completed run of fedavg, 6 rounds``, ``completed``); ``an unfinished run`` when it has no summary."""
    try:
        summary = json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        return "an unfinished run", "unfinished"
    status, algorithm, rounds = str(summary.get("status")), summary.get("algorithm"), summary.get("rounds")
    article = "an" if status[:1] in "aeiou" else "a"
    return f"{article} {status} run of {algorithm}, {rounds} rounds", status


def _refuse_special(path: Path) -> None:
    """The root of the file system, the home folder and the current folder are never a run's folder."""
    resolved = path.expanduser().resolve()
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home folder known
        home = None
    if resolved == Path(resolved.anchor):
        what = "the root of the file system"
    elif home is not None and resolved == home:
        what = "your home folder"
    elif resolved == Path.cwd().resolve():
        what = "the current folder"
    else:
        return
    raise HetflError(f"--out {path}: is {what}; give a folder of its own, e.g. --out results/NAME")


def _refuse_other(out: OutDir) -> None:
    if out.kind == "other":
        raise HetflError(
            f"--out {out.path}: holds files that are not a hetfl run ({out.detail}); hetfl writes only into a new or "
            "empty folder or an earlier run, so give another folder"
        )


def _writable(path: Path) -> OutDir:
    """What ``path`` holds, after refusing what no command may write into: the root, home and current folders, a
    folder another process holds, and a folder of files that are not hetfl's."""
    out = inspect(path)
    _refuse_special(path)
    _refuse_in_use(path)
    _refuse_other(out)
    return out


def check_run_out(path: str | Path, *, overwrite: bool) -> OutDir:
    """Refuse ``path`` as a run's folder unless it is new, empty, or (``overwrite``) an earlier run; change nothing."""
    path = Path(path)
    out = _writable(path)
    if out.kind in ("comparison", "runs", "sweep"):
        raise HetflError(
            f"--out {path}: holds {'other runs' if out.kind == 'runs' else 'a ' + out.kind} ({out.detail}), not "
            f"one run; give a folder of its own, e.g. --out {path / 'NAME'}"
        )
    if out.kind == "run" and not overwrite:
        resumable = out.checkpoint and out.status in ("interrupted", "unfinished")
        hint = f"continue it with hetfl run --resume {path}, " if resumable else ""
        raise HetflError(f"--out {path}: holds {out.detail}; {hint}add --overwrite to replace it, or give another folder")
    return out


def check_comparison_out(path: str | Path, folders: list[str], *, overwrite: bool) -> list[Path]:
    """Refuse ``path`` as a comparison's folder, or any of its run ``folders`` in it, before the first run starts:
    each must be new or empty, or (``overwrite``) what an earlier comparison wrote. Changes nothing; returns the
    earlier comparison's runs that this one does not replace (whose files are to go, :func:`clear_run`)."""
    path = Path(path)
    out = _writable(path)
    if out.kind in ("run", "sweep"):
        raise HetflError(f"--out {path}: holds {'one run' if out.kind == 'run' else 'a sweep'} ({out.detail}), not a "
                         "comparison; give another folder")
    if out.kind == "comparison" and not overwrite:
        raise HetflError(
            f"--out {path}: holds an earlier comparison ({out.detail}); add --overwrite to replace it, or give another "
            "folder"
        )
    if out.kind == "runs" and not (overwrite and set(out.runs) <= set(folders)):
        if set(out.runs) <= set(folders):  # a comparison of these algorithms that ended before its comparison.json
            raise HetflError(f"--out {path}: holds runs of these algorithms ({out.detail}) from a comparison that did "
                             "not finish; add --overwrite to replace them, or give another folder")
        raise HetflError(f"--out {path}: holds other runs ({out.detail}), not a comparison; give another folder")
    for folder in folders:
        member = inspect(path / folder)
        if member.kind == "other":
            raise HetflError(
                f"--out {path}: its folder {folder} holds files that are not a hetfl run ({member.detail}); move them, "
                "or give another folder"
            )
        if member.kind in ("comparison", "runs", "sweep"):
            raise HetflError(f"--out {path}: its folder {folder} holds other runs ({member.detail}); give another folder")
    if out.kind != "comparison":
        return []
    return [path / name for name in _compared(path) if name not in folders and is_run(path / name)]


def _compared(folder: Path) -> list[str]:
    """The run folders of the comparison in ``folder``: its ``comparison.json``'s algorithms' (one seed), or the
    ``folders`` of each algorithm's entry (several seeds)."""
    try:
        entries = json.loads((folder / COMPARISON_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    names = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("folders"), list):
            names += [str(name) for name in entry["folders"] if isinstance(name, str) and name == folder_name(name)]
        elif entry.get("algorithm"):
            names.append(folder_name(str(entry["algorithm"])))
    return names


def check_sweep_out(root: str | Path, folder: str, trials: list[str], *, overwrite: bool) -> list[Path]:
    """Refuse ``root/folder`` as an algorithm's sweep (``hetfl sweep --out ROOT``) unless it is new or empty, or
    (``overwrite``) that algorithm's earlier sweep; ``root`` holds only sweeps (``*/sweep.json``, or the runs of one
    that did not finish). Changes nothing; returns the earlier sweep's run folders not among ``trials`` (whose files
    are to go, :func:`clear_run`)."""
    root, path = Path(root), Path(root) / folder
    _refuse_special(root)
    if root.exists():
        if not root.is_dir():
            raise HetflError(f"--out {root}: exists and is not a folder")
        for entry in sorted(root.iterdir()):
            if entry.name != LOCK_NAME and not (entry.is_dir() and inspect(entry).kind in ("sweep", "runs", "empty")):
                raise HetflError(f"--out {root}: holds {entry.name}, which is not an algorithm's sweep; give a folder "
                                 "of sweeps, or a new one")
    out = _writable(path)
    if out.kind in ("sweep", "runs") and not overwrite:
        raise HetflError(f"--out {root}: holds an earlier sweep of {folder} ({out.detail}); add --overwrite to replace "
                         "it, or give another folder")
    if out.kind not in ("new", "empty", "sweep", "runs"):
        raise HetflError(f"--out {root}: its folder {folder} holds {out.detail}, not a sweep; give another folder")
    return [path / name for name in out.runs if name not in trials]


def check_server_out(path: str | Path, *, fresh: bool) -> bool:
    """Refuse ``path`` as a deployment's folder unless it is new, empty or a run; True if the run there is to be
    resumed (it has a checkpoint, and not ``fresh``). Changes nothing."""
    path = Path(path)
    out = _writable(path)
    if out.kind in ("comparison", "runs", "sweep"):
        raise HetflError(f"--out {path}: holds other runs ({out.detail}), not one run; give a folder of its own")
    return out.checkpoint and not fresh


def clear_run(folder: str | Path) -> None:
    """Remove an earlier run's files from ``folder`` (:data:`RUN_FILES`, the report's) and its row in the run
    index; every other file stays."""
    folder = Path(folder)
    for name in (*RUN_FILES, *REPORT_FILES):
        (folder / name).unlink(missing_ok=True)
    forget_run(folder)


def folder_name(algorithm: str) -> str:
    """A folder name for ``algorithm`` in a comparison: a built-in or entry-point name as it is, an import path
    ``package.module:Class`` as ``package.module.Class`` (no ``:``, which some file systems refuse)."""
    name = algorithm.replace(":", ".")
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name).strip(".") or "_"


# ---------------------------------------------------------------------------- one process per folder
_held: dict[Path, list] = {}  # resolved folder -> [lock file descriptor, depth]: this process's locks
_held_lock = threading.Lock()


def _holder(lock_file: Path) -> str:
    """What the process holding ``lock_file`` wrote into it (its pid and command), or a placeholder."""
    try:
        text = lock_file.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0][:300] if text else "a process that has not said which"


def _refuse_in_use(path: Path) -> None:
    """Refuse ``path`` if another process holds its lock (changes nothing; this process's own locks pass)."""
    lock_file = path / LOCK_NAME
    if not lock_file.is_file() or path.resolve() in _held:
        return
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise HetflError(_in_use_message(path, lock_file)) from None
        raise
    finally:
        os.close(fd)  # releases the probe's lock, if it got one


def _in_use_message(path: Path, lock_file: Path) -> str:
    return (f"--out {path}: in use by another hetfl process ({_holder(lock_file)}); wait for it to end, stop it, or "
            "give another folder")


@contextlib.contextmanager
def lock_out(path: str | Path) -> Iterator[Path]:
    """Hold ``path`` for this process: an exclusive ``flock`` on ``path/.hetfl.lock`` until the block ends (or the
    process does), or a one-line HetflError naming the holder if another process has it. The folder is created if
    need be (after refusing the root, home and current folders and folders of other files, as the checks do), and
    removed again at the end if it was created here and nothing was written. Re-entrant in a process."""
    path = Path(path)
    _refuse_special(path)
    _refuse_other(inspect(path))
    key = path.resolve()
    with _held_lock:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_lock:
                _held[key][1] -= 1
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK_NAME
    fd = -1
    for _ in range(3):  # the file may be replaced between open and lock (a holder that removed its new folder)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise HetflError(_in_use_message(path, lock_file)) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        fd = -1
        path.mkdir(parents=True, exist_ok=True)
    if fd < 0:
        raise HetflError(f"--out {path}: could not lock it (its lock file keeps changing); try again")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {' '.join(['hetfl', *sys.argv[1:]])[:250]}\n".encode())
    with _held_lock:
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _held_lock:
            del _held[key]
        try:  # while still locked (a process that opened it meanwhile sees it replaced, and tries again)
            lock_file.unlink()
            if created and not any(path.iterdir()):
                path.rmdir()  # nothing was written: leave nothing behind
        except OSError:
            pass
        os.close(fd)


__all__ = [
    "CHECKPOINT_NAME", "COMPARISON_NAME", "LOCK_NAME", "REPORT_FILES", "RUN_FILES", "OutDir", "check_comparison_out",
    "check_run_out", "check_server_out", "clear_run", "folder_name", "inspect", "is_run", "lock_out",
]
