"""Per-client tensors under a memory budget: what clients keep between tasks, and what a server keeps per client.

With 100,000 simulated clients, state that grows with every client that ever took part (Ditto's
personal models, SCAFFOLD's control variates, FedStale's last update of each client) does not fit
in memory as a dict of tensors. A :class:`ParamStore` keeps the most recently used tensors in memory
up to ``budget_bytes`` and *spills* the others to memory-mapped files (:class:`numpy.memmap`): one
file per tensor dtype and shape, cut into fixed-size slots, grown by doubling, and a freed slot is
reused. Reading a spilled tensor copies it back out of its slot, so the values a strategy sees are
bit for bit the ones it stored, whatever the budget: a run with a budget of 0 (everything spilled)
gives the same numbers as an unlimited one.

The spill files are anonymous temporary files (:func:`tempfile.TemporaryFile`: in ``TMPDIR``, and
already unlinked on Linux), so they vanish with the process; if ``TMPDIR`` is a RAM disk (tmpfs),
point it at a disk. A checkpoint pickles the store whole (spilled slots included) and a restored store
spills again into new files.

Two views on a store:

- :class:`StoreTable` (``store.table(name)``): a mapping ``client -> tensor`` in insertion order;
  reading an entry (``table[c]``, ``table.get(c)``) marks it recently used, :meth:`StoreTable.peek`
  reads without that (for a sweep over every client). FedStale keeps its memory in one.
- :class:`ClientStates`: each client's state dict (``client_train``'s ``state``), tensors in a table
  per key, other values (lists, numbers, nested dicts) kept as they are; a client's dict is
  materialised by :meth:`ClientStates.load` when the client is active and written back by
  :meth:`ClientStates.save`.
"""

from __future__ import annotations

import math
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np
import torch

FIRST_SLOTS = 64
"""Slots a spill file starts with; it doubles when full."""


class _Slab:
    """A memory-mapped file of fixed-size slots, each the raw bytes of one tensor of ``dtype`` and ``shape``."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], capacity: int = FIRST_SLOTS) -> None:
        self.dtype, self.shape = dtype, shape
        self.slot_bytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        self.file = tempfile.TemporaryFile()
        self.capacity, self.top = 0, 0  # slots in the file; slots ever used
        self.free: list[int] = []
        self.array: np.ndarray | None = None
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self.file.truncate(capacity * self.slot_bytes)
        self.array = np.memmap(self.file, dtype=np.uint8, mode="r+", shape=(capacity, self.slot_bytes))
        self.capacity = capacity

    def write(self, tensor: torch.Tensor) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            if self.top == self.capacity:
                self._grow(2 * self.capacity)
            slot, self.top = self.top, self.top + 1
        self.array[slot] = tensor.reshape(-1).view(torch.uint8).numpy()  # type: ignore[index]
        return slot

    def read(self, slot: int) -> torch.Tensor:
        raw = torch.from_numpy(np.array(self.array[slot]))  # type: ignore[index]  # a copy: the slot may be reused
        return raw.view(self.dtype).reshape(self.shape)

    def __getstate__(self) -> dict[str, Any]:
        used = torch.from_numpy(np.array(self.array[: self.top]))  # type: ignore[index]
        return {"dtype": self.dtype, "shape": self.shape, "top": self.top, "free": self.free, "data": used}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["dtype"], state["shape"], max(FIRST_SLOTS, state["top"]))  # type: ignore[misc]
        self.array[: state["top"]] = state["data"].numpy()  # type: ignore[index]
        self.top, self.free = state["top"], list(state["free"])


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, owning exactly its own bytes (a view into a larger tensor is copied out)."""
    tensor = tensor.detach()
    if (
        not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
    ):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def memory_budget(memory_mb: float | None) -> float:
    """The byte budget of ``training.state_memory_mb`` (None: unlimited)."""
    return math.inf if memory_mb is None else memory_mb * 2**20


class ParamStore:
    """Tensors by (table, client), the most recently used ones in memory up to ``budget_bytes``, the rest spilled.

    Parameters
    ----------
    budget_bytes : float, default inf
        Bytes of tensors kept in memory; the least recently used beyond it go to disk. 0 spills
        every tensor as soon as it is stored; inf never spills.
    """

    def __init__(self, budget_bytes: float = math.inf) -> None:
        if not budget_bytes >= 0:
            raise ValueError(f"budget_bytes must be non-negative, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.resident_bytes = 0
        self.spills = 0  # tensors written to disk so far (diagnostics)
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()  # (table, client) -> bytes, oldest first
        self._tables: dict[str, StoreTable] = {}
        self._slabs: dict[tuple[torch.dtype, tuple[int, ...]], _Slab] = {}

    def table(self, name: str) -> StoreTable:
        """The table ``name`` (created empty the first time)."""
        if name not in self._tables:
            self._tables[name] = StoreTable(self, name)
        return self._tables[name]

    def set_budget(self, budget_bytes: float) -> None:
        """Change the budget, spilling at once what no longer fits."""
        if not budget_bytes >= 0:
            raise ValueError(f"budget_bytes must be non-negative, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._evict()

    @property
    def spilled_bytes(self) -> int:
        """Bytes of the tensors held on disk."""
        return sum((slab.top - len(slab.free)) * slab.slot_bytes for slab in self._slabs.values())

    # -- the bookkeeping the tables call ------------------------------------------------------
    def _admit(self, name: str, client: int, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return  # nothing to spill: stays in memory, outside the budget
        self._lru[(name, client)] = nbytes
        self.resident_bytes += nbytes
        self._evict()

    def _touch(self, name: str, client: int) -> None:
        if (name, client) in self._lru:
            self._lru.move_to_end((name, client))

    def _release(self, name: str, client: int) -> None:
        self.resident_bytes -= self._lru.pop((name, client), 0)

    def _slab(self, tensor: torch.Tensor) -> tuple[tuple[torch.dtype, tuple[int, ...]], _Slab]:
        key = (tensor.dtype, tuple(tensor.shape))
        if key not in self._slabs:
            self._slabs[key] = _Slab(*key)
        return key, self._slabs[key]

    def _evict(self) -> None:
        while self.resident_bytes > self.budget_bytes and self._lru:
            (name, client), nbytes = self._lru.popitem(last=False)
            table = self._tables[name]
            tensor = table._entries[client]
            key, slab = self._slab(tensor)  # type: ignore[arg-type]
            table._entries[client] = (key, slab.write(tensor))  # type: ignore[arg-type]
            self.resident_bytes -= nbytes
            self.spills += 1


class StoreTable(MutableMapping):
    """``client -> tensor`` in a :class:`ParamStore`, in the order clients were first stored.

    Reading an entry marks it recently used; :meth:`peek` reads without that. Stored tensors are
    detached and compacted (a view into a larger tensor is copied out, so the budget counts what is
    really held); never change one in place.
    """

    def __init__(self, store: ParamStore, name: str) -> None:
        self.store, self.name = store, name
        self._entries: dict[int, Any] = {}  # client -> tensor (in memory) or (slab key, slot) (spilled)

    def __getitem__(self, client: int) -> torch.Tensor:
        entry = self._entries[client]
        if isinstance(entry, torch.Tensor):
            self.store._touch(self.name, client)
            return entry
        key, slot = entry
        slab = self.store._slabs[key]
        tensor = slab.read(slot)
        slab.free.append(slot)
        self._entries[client] = tensor
        self.store._admit(self.name, client, tensor)
        return tensor

    def peek(self, client: int) -> torch.Tensor:
        """``self[client]`` without marking it recently used or loading it into memory."""
        entry = self._entries[client]
        if isinstance(entry, torch.Tensor):
            return entry
        key, slot = entry
        return self.store._slabs[key].read(slot)

    def __setitem__(self, client: int, tensor: torch.Tensor) -> None:
        tensor = _compact(tensor)
        self._drop(client)
        self._entries[client] = tensor  # an existing client keeps its place in the order
        self.store._admit(self.name, client, tensor)

    def __delitem__(self, client: int) -> None:
        self._drop(client)
        del self._entries[client]

    def _drop(self, client: int) -> None:
        """Release what ``client``'s entry holds (memory or slot); the entry itself stays."""
        entry = self._entries.get(client)
        if isinstance(entry, torch.Tensor):
            self.store._release(self.name, client)
        elif entry is not None:
            key, slot = entry
            self.store._slabs[key].free.append(slot)

    def discard(self, client: int) -> None:
        """Forget ``client``'s tensor, if any."""
        if client in self._entries:
            del self[client]

    def spilled(self, client: int) -> bool:
        """Whether ``client``'s tensor is on disk now."""
        return not isinstance(self._entries[client], torch.Tensor)

    def __contains__(self, client: object) -> bool:
        return client in self._entries

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"StoreTable({self.name!r}, {len(self)} clients)"


STATE_TABLE = "state/"
"""Prefix of the store tables that hold the tensors of client states (``state/v``: Ditto's personal models)."""


class ClientStates:
    """Each client's persistent state (a dict of tensors and other values), compact while the client is idle.

    Tensor values live in the store table ``state/<key>``; other values (counters, lists, nested dicts)
    stay as they are. A client without state costs nothing. Use :meth:`load` to get a client's dict
    and :meth:`save` to write it back after changing it; the dict returned is a copy, so changing it
    alone changes nothing. ``get``, ``[c]``, ``in``, ``len``, iteration and ``items()`` read like a dict.
    """

    def __init__(self, store: ParamStore | None = None) -> None:
        self.store = store if store is not None else ParamStore()
        self._keys: dict[int, tuple[str, ...]] = {}  # client -> its state's keys, in order
        self._other: dict[int, dict[str, Any]] = {}  # client -> its non-tensor values
        self._layouts: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple object per distinct key list

    def load(self, client: int) -> dict[str, Any]:
        """Client ``client``'s state, materialised (empty if it has none)."""
        other = self._other.get(client, {})
        return {
            k: other[k] if k in other else self.store.table(STATE_TABLE + k)[client]
            for k in self._keys.get(client, ())
        }

    def save(self, client: int, state: dict[str, Any]) -> None:
        """Make ``state`` client ``client``'s state (an empty dict removes it)."""
        for key in self._keys.get(client, ()):
            if not isinstance(state.get(key), torch.Tensor):
                self.store.table(STATE_TABLE + key).discard(client)
        other = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                self.store.table(STATE_TABLE + key)[client] = value
            else:
                other[key] = value
        if other:
            self._other[client] = other
        else:
            self._other.pop(client, None)
        if state:
            keys = tuple(state)
            self._keys[client] = self._layouts.setdefault(keys, keys)
        else:
            self._keys.pop(client, None)

    def get(self, client: int, default: Any = None) -> Any:
        return self.load(client) if client in self._keys else default

    def __getitem__(self, client: int) -> dict[str, Any]:
        if client not in self._keys:
            raise KeyError(client)
        return self.load(client)

    def __setitem__(self, client: int, state: dict[str, Any]) -> None:
        self.save(client, state)

    def __delitem__(self, client: int) -> None:
        if client not in self._keys:
            raise KeyError(client)
        self.save(client, {})

    def __contains__(self, client: object) -> bool:
        return client in self._keys

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[int]:
        return list(self._keys)

    def items(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for client in list(self._keys):
            yield client, self.load(client)
