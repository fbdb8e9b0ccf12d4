"""What a config names as code: hetfl's built-in names, names that installed packages add, and import paths.

Every key of a config that names code goes through :func:`resolve`:

==========================  ===========  ================================================================
key                         kind         what the name must give
==========================  ===========  ================================================================
``model.name``, each        ``model``    an ``nn.Module`` class or a factory returning one
``model.zoo[i].name``
``data.dataset``            ``dataset``  a loader function (see :mod:`hetfl.data.datasets`)
``data.partition.kind``     ``partition``  a partitioner ``(labels, n_clients, rng, **params) -> parts``
``strategy.name``           ``strategy``   a :class:`~hetfl.strategies.base.Strategy` subclass
``strategy.selection.name`` ``selection``  a :class:`~hetfl.strategies.selection.Selection` subclass
``client``                  ``client``     a Flower ``client_fn`` (:mod:`hetfl.flower`)
``tracking.callbacks[i]``   ``tracker``    a tracker class or factory (:mod:`hetfl.results.tracking`)
==========================  ===========  ================================================================

A name is one of:

- a **built-in** name (``fedavg``, ``mlp``, ``dirichlet``): hetfl's own code, listed below as import paths and
  imported by the same function as a user's, so the door users come through is the one hetfl's own code uses;
- a name an installed package adds through an **entry point** of the kind's group (``hetfl.strategies``,
  ``hetfl.models``, ``hetfl.datasets``, ``hetfl.partitions``, ``hetfl.selections``, ``hetfl.trackers``); a built-in name wins
  over an entry point of the same name;
- an **import path** ``package.module:attribute`` (the attribute may be dotted, ``module:Class.factory``). The
  module is imported from the directory of the config file, the current working directory, the directory it
  was found in when the run was made (so ``--resume`` finds it from anywhere), or ``sys.path`` (an installed
  package), in that order. The directory it is found in stays on ``sys.path``, so checkpoints that pickle the
  user's objects load again.

Whatever is not built in is *user code*: its import path, origin, source file and that file's SHA-256 are
recorded (:class:`Resolved`, the config's ``code`` section), so a resumed run, a comparison and a deployed
client can tell when the code changed. A name that does not import, a missing attribute or an object of the
wrong kind is a :class:`~hetfl.errors.ConfigError` of one line naming the key and the path.

From Python, an object itself may be given where a name is expected (``model: {name: MyNet}``):
:func:`import_path` names it ``module:qualname`` and remembers the object, so classes defined in a script or
a notebook work in that process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetfl.errors import ConfigError, HetflError

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_<>][\w<>]*)*$")
"""``package.module:attribute``, the attribute possibly dotted (``<locals>`` only for objects given in Python)."""


@dataclass(frozen=True)
class Kind:
    """One kind of code a config names."""

    name: str  # "strategy"
    group: str  # entry-point group
    what: str  # what the object must be, for messages: "a Strategy subclass"
    noun: str  # what a name names, for messages: "algorithm"
    builtins: dict[str, str]  # built-in name -> import path


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("strategy", "hetfl.strategies", "a hetfl.strategies.Strategy subclass", "algorithm", {
            "fedavg": "hetfl.strategies.fedavg:FedAvg",
            "fedprox": "hetfl.strategies.fedprox:FedProx",
            "fednova": "hetfl.strategies.fednova:FedNova",
            "scaffold": "hetfl.strategies.scaffold:Scaffold",
            "fedld": "hetfl.strategies.fedld:FedLD",
            "fedadam": "hetfl.strategies.fedopt:FedAdam",
            "fedyogi": "hetfl.strategies.fedopt:FedYogi",
            "fedstale": "hetfl.strategies.fedstale:FedStale",
            "fedvarp": "hetfl.strategies.fedstale:FedVARP",
            "fedamd": "hetfl.strategies.fedamd:FedAMD",
            "fedasync": "hetfl.strategies.fedasync:FedAsync",
            "fedbuff": "hetfl.strategies.fedbuff:FedBuff",
            "fedcompass": "hetfl.strategies.fedcompass:FedCompass",
            "ditto": "hetfl.strategies.ditto:Ditto",
            "fedavg_ft": "hetfl.strategies.finetune:FedAvgFineTune",
            "fedper": "hetfl.strategies.partial:FedPer",
            "fedrep": "hetfl.strategies.partial:FedRep",
            "fedbn": "hetfl.strategies.fedbn:FedBN",
            "lgfedavg": "hetfl.strategies.hetero:LGFedAvg",
            "ifca": "hetfl.strategies.ifca:IFCA",
            "feddaa": "hetfl.strategies.feddaa:FedDAA",
            "flhc": "hetfl.strategies.clustered:FLHC",
            "ocfl": "hetfl.strategies.ocfl:OCFL",
            "hcmeta": "hetfl.strategies.hcmeta:HCMeta",
            "local": "hetfl.strategies.hetero:LocalOnly",
            "fedproto": "hetfl.strategies.fedproto:FedProto",
            "fedgh": "hetfl.strategies.fedgh:FedGH",
            "semipfl": "hetfl.strategies.semipfl:SemiPFL",
            "ggeur": "hetfl.strategies.ggeur:GGEUR",
            "fedsa": "hetfl.strategies.fedsa:FedSA",
            "pfedgate": "hetfl.strategies.pfedgate:PFedGate",
            "hidenseek": "hetfl.strategies.hidenseek:HideNseek",
            "fedtiny": "hetfl.strategies.fedtiny:FedTiny",
            "fedconv": "hetfl.strategies.fedconv:FedConv",
            "pfedpg": "hetfl.strategies.pfedpg:PFedPG",
            "fedins": "hetfl.strategies.fedins:FedIns",
            "fml": "hetfl.strategies.fml:FML",
            "pfedlora": "hetfl.strategies.adapters:AdapterFL",
            "fedlora": "hetfl.strategies.fedlora:FedLoRA",
            "fedspine": "hetfl.strategies.fedspine:FedSpine",
            "cellm": "hetfl.strategies.cellm:CELLM",
            "hdee": "hetfl.strategies.hdee:HDEE",
            "flexmore": "hetfl.strategies.flexmore:FlexMoRE",
        }),
        Kind("selection", "hetfl.selections", "a hetfl.strategies.selection.Selection subclass", "selection", {
            "random": "hetfl.strategies.selection:RandomSelection",
            "oort": "hetfl.strategies.selection:Oort",
            "hetero_select": "hetfl.strategies.selection:HeteRoSelect",
        }),
        Kind("model", "hetfl.models", "a torch.nn.Module class or a function that returns one", "model", {
            "logreg": "hetfl.models.zoo:logreg",
            "mlp": "hetfl.models.zoo:mlp",
            "cnn": "hetfl.models.zoo:cnn",
            "cnn1d": "hetfl.models.zoo:cnn1d",
            "resnet": "hetfl.models.zoo:resnet",
            "tinylm": "hetfl.models.transformer:tinylm",
        }),
        Kind("dataset", "hetfl.datasets", "a function that loads the data", "dataset", {
            "digits": "hetfl.data.datasets:load_digits",
            "text": "hetfl.data.datasets:load_text",
            "synthetic": "hetfl.data.synthetic:SyntheticData",
            "mnist1d": "hetfl.data.mnist1d:load_mnist1d",
            "mnist": "hetfl.data.datasets:load_mnist",
            "fashion_mnist": "hetfl.data.datasets:load_mnist",
            "cifar10": "hetfl.data.datasets:load_cifar10",
            "leaf": "hetfl.data.datasets:load_leaf",
            "csv": "hetfl.data.datasets:load_csv",
            "npz": "hetfl.data.datasets:load_npz",
            "hf": "hetfl.data.datasets:load_hf",
        }),
        Kind("partition", "hetfl.partitions", "a partitioner function (labels, n_clients, rng, **params)", "partition", {
            "iid": "hetfl.data.partition:iid",
            "dirichlet": "hetfl.data.partition:dirichlet",
            "shards": "hetfl.data.partition:shards",
            "quantity": "hetfl.data.partition:quantity",
            "natural": "hetfl.data.partition:natural",
            "embedding": "hetfl.data.partition:embedding",
        }),
        Kind("client", "hetfl.clients", "a Flower client_fn (context -> Client or NumPyClient)", "client", {}),
        Kind("tracker", "hetfl.trackers", "a tracker class or factory (hetfl.results.tracking)", "tracker", {
            "csv": "hetfl.results.tracking:CSVTracker",
            "tensorboard": "hetfl.results.tracking:TensorBoardTracker",
            "mlflow": "hetfl.results.tracking:MLflowTracker",
        }),
    )
}


def _check_kind(kind: str, obj: Any) -> bool:
    """Whether ``obj`` can be what a name of ``kind`` names (a factory's result is checked when it is called)."""
    if kind == "strategy":
        from hetfl.strategies.base import Strategy

        return inspect.isclass(obj) and issubclass(obj, Strategy)
    if kind == "selection":
        from hetfl.strategies.selection import Selection

        return inspect.isclass(obj) and issubclass(obj, Selection)
    if kind == "model":
        import torch

        return (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)) or (callable(obj) and not inspect.isclass(obj))
    return callable(obj)


@dataclass(frozen=True)
class Resolved:
    """A name resolved to its object, and where the object came from.

    Attributes
    ----------
    spec : str
        What the config said: a built-in name, an entry-point name or an import path.
    obj : object
        The class or function.
    origin : str
        ``built-in``, ``entry point <distribution> <version>``, or ``import path``.
    path : str
        Its import path, ``module:attribute``.
    file : str or None
        The source file that defines it (None when it has none, e.g. typed at a prompt).
    sha256 : str or None
        SHA-256 of that file's bytes.
    root : str or None
        The ``sys.path`` entry its top-level package was imported from (what ``--resume`` searches).
    """

    spec: str
    obj: Any
    origin: str
    path: str
    file: str | None = None
    sha256: str | None = None
    root: str | None = None

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"

    def record(self) -> dict[str, Any]:
        """What ``config.yaml`` and ``summary.json`` keep of user code (the config's ``code`` section)."""
        return {"path": self.path, "origin": self.origin, "file": self.file, "sha256": self.sha256, "root": self.root}


# --------------------------------------------------------------------------- entry points
_entry_points: dict[str, dict[str, importlib.metadata.EntryPoint]] = {}


def entry_points(kind: str) -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points installed packages declare in ``kind``'s group, by name (read once per process)."""
    group = KINDS[kind].group
    if group not in _entry_points:
        found: dict[str, importlib.metadata.EntryPoint] = {}
        try:
            for ep in importlib.metadata.entry_points(group=group):
                found.setdefault(ep.name, ep)
        except Exception:  # a broken distribution's metadata must not stop hetfl
            pass
        _entry_points[group] = found
    return _entry_points[group]


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def names(kind: str) -> dict[str, tuple[str, str]]:
    """Every plain name of ``kind``: name -> (import path, origin); built-ins first, then entry points."""
    table = {name: (path, "built-in") for name, path in KINDS[kind].builtins.items()}
    for name, ep in sorted(entry_points(kind).items()):
        table.setdefault(name, (ep.value, f"entry point {_distribution(ep)}"))
    return table


def is_builtin(kind: str, spec: str) -> bool:
    return spec in KINDS[kind].builtins


def is_import_path(spec: str) -> bool:
    return ":" in spec


def check_name(kind: str, spec: Any) -> str:
    """``spec`` as a name of ``kind``: an object given from Python becomes its import path; a plain name must be
    known and an import path well formed (ValueError otherwise, whose message the config turns into one line)."""
    if not isinstance(spec, str):
        return import_path(spec)
    spec = spec.strip()
    if is_import_path(spec):
        if not IMPORT_PATH.match(spec):
            raise ValueError(f"'{spec}' is not an import path of the form package.module:attribute")
        return spec
    if spec in KINDS[kind].builtins or spec in entry_points(kind):
        return spec
    known = ", ".join(names(kind))
    k = KINDS[kind]
    raise ValueError(
        f"unknown {k.noun} '{spec}' (known: {known or 'none'}; or an import path package.module:attribute to "
        f"{k.what})"
    )


# --------------------------------------------------------------------------- objects given from Python
_objects: dict[str, Any] = {}


def import_path(obj: Any) -> str:
    """The import path of a class or function given from Python (``module:qualname``), remembered with the object
    so that it resolves in this process even when no file can import it (a script's ``__main__``, a notebook)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or not callable(obj):
        raise ValueError(f"expected a name, an import path or a class or function, got {type(obj).__name__}")
    path = f"{module}:{qualname}"
    _objects[path] = obj
    return path


# --------------------------------------------------------------------------- resolution
_cache: dict[tuple[str, str], Resolved] = {}


def resolve(kind: str, spec: str, *, key: str, search: Iterable[str | Path | None] = ()) -> Resolved:
    """The object ``spec`` names, as a :class:`Resolved`; a ConfigError naming ``key`` if it cannot be had.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    spec : str
        A built-in name, an entry-point name or an import path.
    key : str
        The config key that named it, for messages (``strategy.name``).
    search : iterable of paths
        Directories tried, in order, before ``sys.path`` for an import path's top-level module (the config file's
        directory, the current directory, the directory recorded for a resumed run); None entries are skipped.
    """
    cached = _cache.get((kind, spec))
    if cached is not None:
        return cached
    k = KINDS[kind]
    if spec in k.builtins:
        resolved = _load(kind, spec, k.builtins[spec], key, "built-in", ())
    elif not is_import_path(spec) and spec in entry_points(kind):
        ep = entry_points(kind)[spec]
        resolved = _load(kind, spec, ep.value, key, f"entry point {_distribution(ep)}", ())
    else:
        try:
            check_name(kind, spec)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
        resolved = _load(kind, spec, spec, key, "import path", search)
    _cache[(kind, spec)] = resolved
    return resolved


def load(kind: str, spec: str, *, key: str) -> Any:
    """The object ``spec`` names (:func:`resolve`'s ``obj``)."""
    return resolve(kind, spec, key=key).obj


def _load(kind: str, spec: str, path: str, key: str, origin: str, search: Iterable[str | Path | None]) -> Resolved:
    module_name, _, attribute = path.partition(":")
    root: str | None = None
    if path in _objects:  # given from Python
        obj = _objects[path]
        root = _root_of(sys.modules.get(module_name)) if module_name != "__main__" else None
    else:
        root = _import_root(module_name, search) if origin == "import path" else None
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):  # the module itself, not its dependency
                where = ", ".join(str(p) for p in _dirs(search)) or "the current directory"
                raise ConfigError(
                    f"{key}: cannot import '{module_name}' for {spec} (looked in {where} and sys.path); check the "
                    "spelling, or install the package that provides it"
                ) from None
            raise ConfigError(f"{key}: importing {module_name} for {spec} failed: {_short(err)}") from None
        except Exception as err:  # the user's module raised while importing: say where
            raise ConfigError(f"{key}: importing {module_name} for {spec} failed: {_short(err)}") from None
        obj = module
        for part in attribute.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"{key}: {module_name} has no attribute '{attribute}' ({spec})")
            obj = getattr(obj, part)
        if root is None and origin == "import path":
            root = _root_of(module)
    if not _check_kind(kind, obj):
        raise ConfigError(f"{key}: {spec} is {_describe(obj)}, not {KINDS[kind].what}")
    if origin == "built-in":
        return Resolved(spec, obj, origin, path)
    file = _source_file(obj)
    digest = hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else None
    return Resolved(spec, obj, origin, path, file, digest, root)


def _dirs(search: Iterable[str | Path | None]) -> list[Path]:
    seen: list[Path] = []
    for entry in search:
        if entry is None:
            continue
        path = Path(entry).expanduser().resolve()
        if path not in seen:
            seen.append(path)
    return seen


def _import_root(module_name: str, search: Iterable[str | Path | None]) -> str | None:
    """The first of ``search`` that holds ``module_name``'s top-level module or package, put first on ``sys.path``
    (and left there, so later imports and unpickling find it); None if none does (``sys.path`` decides)."""
    top = module_name.split(".")[0]
    if top in sys.modules:  # imported already (from wherever): Python will not import it twice
        return None
    for folder in _dirs(search):
        if (folder / f"{top}.py").is_file() or (folder / top).is_dir():
            entry = str(folder)
            if entry in sys.path:
                sys.path.remove(entry)
            sys.path.insert(0, entry)
            importlib.invalidate_caches()
            return entry
    return None


def _root_of(module: Any) -> str | None:
    """The ``sys.path`` entry ``module``'s top-level package was imported from."""
    top = sys.modules.get(getattr(module, "__name__", "").split(".")[0])
    file = getattr(top, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    return str(path.parent.parent if path.name == "__init__.py" else path.parent)


def _source_file(obj: Any) -> str | None:
    try:
        file = inspect.getsourcefile(obj)
    except TypeError:
        file = None
    if file is None:
        module = sys.modules.get(getattr(obj, "__module__", "") or "")
        file = getattr(module, "__file__", None)
    return str(Path(file).resolve()) if file and Path(file).is_file() else None


def _describe(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "a module"
    if inspect.isclass(obj):
        return f"the class {obj.__name__}"
    if callable(obj):
        return f"the function {getattr(obj, '__name__', repr(obj))}"
    return f"a {type(obj).__name__} ({obj!r:.40})"


def _short(err: BaseException) -> str:
    """An exception in one line, with the user's file and line where there is one."""
    where = ""
    if isinstance(err, SyntaxError) and err.filename:
        where = f" ({err.filename}, line {err.lineno})"
    else:
        frames = traceback.extract_tb(err.__traceback__)
        user = [f for f in frames if "importlib" not in f.filename]
        if user:
            where = f" ({user[-1].filename}, line {user[-1].lineno})"
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}{': ' + text if text else ''}{where}"


# --------------------------------------------------------------------------- calling user code
def call(factory: Callable[..., Any], provided: dict[str, Any], params: dict[str, Any], *, key: str, spec: str) -> Any:
    """``factory(**params, **those of provided its signature asks for)``.

    ``provided`` are what hetfl knows and passes when asked (``input_shape``, ``n_classes``, ``seed``, ...): a
    parameter of that name, or any of them to a factory taking ``**kwargs``. ``params`` are the user's keyword
    arguments (``model.params``); one that names a provided value overrides it. A TypeError from the call (a
    parameter the factory does not take, a required one missing) is one line naming ``key``.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: pass only the user's parameters
        signature = None
    kwargs: dict[str, Any] = {}
    if signature is not None:
        accepted = signature.parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        for name, value in provided.items():
            if name in accepted or var_kw:
                kwargs[name] = value
        unknown = [p for p in params if p not in accepted and not var_kw]
        if unknown:
            known = [n for n, p in accepted.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in provided]
            raise ConfigError(f"{key}: {spec} takes no parameter '{unknown[0]}' (its parameters: {', '.join(known) or 'none'})")
    kwargs.update(params)
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as err:
            raise ConfigError(f"{key}: {spec}: {err}") from None
    try:
        return factory(**kwargs)
    except HetflError:
        raise
    except Exception as err:  # the user's code failed: one line with its file and line (HETFL_DEBUG=1: the traceback)
        if os.environ.get("HETFL_DEBUG"):
            raise
        raise ConfigError(f"{key}: {spec}({', '.join(kwargs)}) raised {_short(err)}") from None


def user_search_path() -> list[str]:
    """Where import paths are looked for when no config file is involved: the current directory."""
    return [os.getcwd()]
