"""Model specs: ``package.module:factory`` or ``path/to/file.py:factory``, and loading them.

A spec names a callable that returns an ``nn.Module``. Loading a spec imports (runs) the named module, so
it must come from the person at the keyboard: the CLI imports a spec only when it was given as ``--model``
on the command line, never one read from a config file, checkpoint, recipe or store (see
``docs/external.md``). The Python API trusts its caller: ``TrainConfig(model="my_models.py:resnet")`` or
``TrainConfig(model=resnet)`` (a module-level function) loads it.

A file spec is imported under a private module name derived from the file's absolute path and content
hash, so editing the file and loading it again runs the new code (and a second file called ``models.py``
elsewhere does not shadow the first).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from normlab.errors import NormlabError

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ATTRIBUTE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_model_spec(name: object) -> bool:
    """True for ``module:factory`` / ``file.py:factory`` strings (registered model names have no colon)."""
    return isinstance(name, str) and ":" in name


def split_spec(spec: str) -> tuple[str, str]:
    """``(module or file, attribute path)``; a malformed spec raises NormlabError saying the two forms."""
    where, _, attribute = spec.rpartition(":")
    ok_where = where.endswith(".py") or bool(_MODULE.match(where))
    if not where or not ok_where or not _ATTRIBUTE.match(attribute):
        raise NormlabError(
            f"model spec {spec!r} is malformed; use package.module:factory or path/to/file.py:factory"
        )
    return where, attribute


def spec_file(spec: str) -> Path | None:
    """The source file a spec points at without importing anything: the ``.py`` file itself, or the module's
    file as found by ``importlib.util.find_spec`` (which imports parent packages only); None if not found."""
    where, _ = split_spec(spec)
    if where.endswith(".py"):
        path = Path(where).expanduser()
        return path.resolve() if path.is_file() else None
    try:
        found = importlib.util.find_spec(where)
    except (ImportError, ValueError):
        return None
    if found is None or found.origin in (None, "built-in", "frozen"):
        return None
    return Path(found.origin)


def load_factory(spec: str) -> Callable[..., Any]:
    """Import the module or file of ``spec`` and return its factory.

    Raises:
        NormlabError: a missing file or module, a module that fails to import (its error in the message), a
            missing attribute, or one that is not callable; one line each.
    """
    where, attribute = split_spec(spec)
    module = _import_file(spec, where) if where.endswith(".py") else _import_module(spec, where)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise NormlabError(f"model spec {spec!r}: {where} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise NormlabError(f"model spec {spec!r}: {attribute} is a {type(target).__name__}, not a callable")
    return target


def spec_of(factory: Callable[..., Any]) -> str:
    """The spec that loads ``factory`` again (also in another process): ``module:qualname`` for a function
    of an importable module, ``file.py:qualname`` for one defined in a script (``__main__``) or a file.

    Raises:
        NormlabError: a lambda or a function defined inside another function (nothing can load it again).
    """
    if not callable(factory):
        raise NormlabError(f"a model factory must be callable, got {type(factory).__name__}")
    qualname = getattr(factory, "__qualname__", "")
    if not qualname or "<" in qualname:
        raise NormlabError(
            f"model factory {qualname or factory!r} is a lambda or local function; define it at module level "
            "so a worker process can load it again"
        )
    module_name = getattr(factory, "__module__", None)
    module = sys.modules.get(module_name) if module_name else None
    file = getattr(module, "__file__", None)
    if module_name == "__main__" or (module_name or "").startswith(_FILE_MODULE_PREFIX):
        if file is None:
            raise NormlabError(f"model factory {qualname} lives in an interactive session; put it in a file")
        return f"{Path(file).resolve()}:{qualname}"
    if module_name is None:
        raise NormlabError(f"model factory {qualname} has no module")
    return f"{module_name}:{qualname}"


def call_signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


_FILE_MODULE_PREFIX = "normlab_user_"


def _import_file(spec: str, where: str) -> ModuleType:
    path = Path(where).expanduser()
    if not path.is_file():
        raise NormlabError(f"model spec {spec!r}: file {where!r} does not exist")
    path = path.resolve()
    source = path.read_bytes()
    digest = hashlib.sha256(str(path).encode() + b"\0" + source).hexdigest()[:16]
    name = f"{_FILE_MODULE_PREFIX}{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise NormlabError(f"model spec {spec!r}: cannot load {where!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # sys.exit() in a user file: say so, not exit
        del sys.modules[name]
        raise NormlabError(f"model spec {spec!r}: importing {where} failed: {_describe(exc)}") from None
    return module


def _import_module(spec: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        raise NormlabError(
            f"model spec {spec!r}: no module named {exc.name or where!r} (is it on PYTHONPATH?)"
        ) from None
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        raise NormlabError(f"model spec {spec!r}: importing {where} failed: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]
