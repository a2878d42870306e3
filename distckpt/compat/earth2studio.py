"""Route Earth2Studio's checkpoint calls to distckpt.

New code needs no adapter: import ``Checkpoint``, ``bind_checkpoint_state`` and friends from
``distckpt`` instead of ``earth2studio.utils.checkpoint``. Earth2Studio's own components and
workflows (``earth2studio.perturbation.Gaussian``, ``earth2studio.models.px.Persistence``,
``earth2studio.run.ensemble``, ...) import those names from ``earth2studio.utils.checkpoint``
when their modules load; :func:`use_distckpt` swaps them for distckpt's::

    from distckpt import Checkpoint
    from distckpt.compat.earth2studio import use_distckpt

    use_distckpt()  # before constructing any Earth2Studio component
    ckpt = Checkpoint("ensemble", path="/scratch/ckpt", level=2)
    with ckpt as session:
        model = Persistence(variables, domain)  # binds its state into the distckpt store
        perturbation = Gaussian(0.1, seed=1)
        earth2studio.run.ensemble(..., checkpoint=session)

What is swapped, and where:

- ``earth2studio.utils.checkpoint`` itself: ``bind_checkpoint_state``, ``Checkpoint``,
  ``CheckpointSession``, ``NullCheckpoint``, ``CheckpointState``, ``CheckpointEntry``,
  ``default_checkpoint_path`` and the error classes ``CheckpointError``,
  ``CheckpointStateCollision``, ``CheckpointSerializationError``,
  ``CheckpointStateSchemaError`` become distckpt's. Earth2Studio modules imported later
  (``from earth2studio.utils.checkpoint import bind_checkpoint_state`` runs when they load)
  therefore get distckpt's objects: no import hook is needed.
- every already imported ``earth2studio`` module: any module attribute that *is* one of the
  original objects (compared by identity, so aliases are found too) is replaced.
- defaults of functions and methods defined in those modules that are
  ``earth2studio`` ``NullCheckpoint`` instances (``run.ensemble(checkpoint=NullCheckpoint())``)
  become distckpt ``NullCheckpoint`` instances, so ``isinstance(ckpt, NullCheckpoint)`` in
  the workflows keeps recognising the default.

Not swapped: references held outside ``earth2studio`` (your own ``from
earth2studio.utils.checkpoint import Checkpoint`` executed before the call), and components
constructed before the call (they keep an Earth2Studio proxy). Call :func:`use_distckpt`
first, then build components. Objects of the two libraries do not mix: after the call,
components bind only into a distckpt ``Checkpoint``.

The swap is process-wide. :func:`use_distckpt` returns a handle; the swap stays until every
handle was released (``handle.undo()``, or leaving ``with use_distckpt():``), which puts the
original objects back everywhere, including modules imported in between.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import FunctionType, ModuleType, TracebackType
from typing import Any

from distckpt import errors
from distckpt.session import binding, checkpoint

#: The Earth2Studio module whose names are swapped.
SOURCE_MODULE = "earth2studio.utils.checkpoint"

#: The names swapped in :data:`SOURCE_MODULE` and the distckpt object each becomes.
REPLACEMENTS: dict[str, Any] = {
    "bind_checkpoint_state": binding.bind_checkpoint_state,
    "Checkpoint": checkpoint.Checkpoint,
    "CheckpointSession": checkpoint.CheckpointSession,
    "NullCheckpoint": checkpoint.NullCheckpoint,
    "CheckpointState": binding.CheckpointState,
    "CheckpointEntry": checkpoint.CheckpointEntry,
    "default_checkpoint_path": checkpoint.default_checkpoint_path,
    "CheckpointError": errors.CheckpointError,
    "CheckpointStateCollision": errors.CheckpointStateCollision,
    "CheckpointSerializationError": errors.CheckpointSerializationError,
    "CheckpointStateSchemaError": errors.CheckpointStateSchemaError,
}

_lock = threading.RLock()
_handles: set[int] = set()
_originals: dict[str, Any] = {}  # name -> the Earth2Studio object, while swapped
_next_handle = 0


class Earth2StudioPatch:
    """A reference to the swap made by :func:`use_distckpt`; a context manager."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    @property
    def active(self) -> bool:
        """Whether this handle still holds the swap (False after :meth:`undo`)."""
        with _lock:
            return self._handle in _handles

    def undo(self) -> None:
        """Release this handle; the last one released puts Earth2Studio's objects back.

        Idempotent: releasing a handle twice does nothing the second time.
        """
        with _lock:
            if self._handle not in _handles:
                return
            _handles.discard(self._handle)
            if not _handles:
                _restore()

    def __enter__(self) -> Earth2StudioPatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"Earth2StudioPatch(active={self.active})"


def use_distckpt() -> Earth2StudioPatch:
    """Make Earth2Studio's components and workflows checkpoint through distckpt.

    Idempotent: the first call swaps the objects (see the module docstring); later calls
    swap again in modules that hold originals (there should be none) and return a new
    handle on the same swap. Raises :class:`distckpt.CheckpointError` when Earth2Studio is
    not installed.
    """
    global _next_handle
    source = _import_source()
    with _lock:
        if not _handles:
            _originals.clear()
            for name in REPLACEMENTS:
                if not hasattr(source, name):
                    raise errors.CheckpointError(
                        f"{SOURCE_MODULE} has no {name!r}: this Earth2Studio version is not "
                        "supported by distckpt.compat.earth2studio"
                    )
                original = getattr(source, name)
                if original is not REPLACEMENTS[name]:
                    _originals[name] = original
        _swap(
            {id(_originals[n]): (_originals[n], REPLACEMENTS[n]) for n in _originals},
            _originals.get("NullCheckpoint"),
            checkpoint.NullCheckpoint,
        )
        _next_handle += 1
        _handles.add(_next_handle)
        return Earth2StudioPatch(_next_handle)


def is_active() -> bool:
    """Whether Earth2Studio's checkpoint names currently resolve to distckpt's."""
    with _lock:
        return bool(_handles)


def _import_source() -> ModuleType:
    try:
        return importlib.import_module(SOURCE_MODULE)
    except ImportError as exc:
        raise errors.CheckpointError(
            "distckpt.compat.earth2studio needs the 'earth2studio' package "
            f"({SOURCE_MODULE} cannot be imported: {exc}); install it with "
            "`pip install torch==<your torch version> earth2studio`"
        ) from exc


def _restore() -> None:
    if _originals:
        _swap(
            {id(REPLACEMENTS[n]): (REPLACEMENTS[n], _originals[n]) for n in _originals},
            checkpoint.NullCheckpoint,
            _originals.get("NullCheckpoint"),
        )
    _originals.clear()


def _earth2studio_modules() -> list[ModuleType]:
    return [
        module
        for name, module in list(sys.modules.items())
        if (name == "earth2studio" or name.startswith("earth2studio."))
        and isinstance(module, ModuleType)
    ]


def _swap(
    objects: dict[int, tuple[Any, Any]], null_from: type | None, null_to: type | None
) -> None:
    """In every loaded ``earth2studio`` module, replace each attribute that is an ``old``
    object of ``objects`` (by identity) with its ``new`` one, and function defaults that are
    ``null_from`` instances with ``null_to`` instances."""
    for module in _earth2studio_modules():
        namespace = vars(module)
        for attr, value in list(namespace.items()):
            found = objects.get(id(value))
            if found is not None and found[0] is value:
                setattr(module, attr, found[1])
        if null_from is None or null_to is None:
            continue
        for value in list(namespace.values()):
            if isinstance(value, FunctionType) and value.__module__ == module.__name__:
                _swap_defaults(value, null_from, null_to)
            elif isinstance(value, type) and value.__module__ == module.__name__:
                for member in list(vars(value).values()):
                    if isinstance(member, staticmethod | classmethod):
                        member = member.__func__
                    if isinstance(member, FunctionType):
                        _swap_defaults(member, null_from, null_to)


def _swap_defaults(func: FunctionType, null_from: type, null_to: type) -> None:
    if func.__defaults__ and any(type(d) is null_from for d in func.__defaults__):
        func.__defaults__ = tuple(
            null_to() if type(d) is null_from else d for d in func.__defaults__
        )
    kw = func.__kwdefaults__
    if kw and any(type(d) is null_from for d in kw.values()):
        func.__kwdefaults__ = {k: null_to() if type(d) is null_from else d for k, d in kw.items()}


__all__ = ["REPLACEMENTS", "SOURCE_MODULE", "Earth2StudioPatch", "is_active", "use_distckpt"]
