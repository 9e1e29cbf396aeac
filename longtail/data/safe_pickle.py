"""A restricted unpickler for the data pickles we read: the CIFAR python archives, DB-Loss's split files.

A pickle can run any function it names, so loading a file from the internet with plain `pickle.load`
is code execution. These pickles only need numpy to rebuild arrays and the builtin set (DB-Loss's
class_split.pkl holds sets of class ids); every other global is refused before it is looked up, so
nothing from a hostile file runs.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from longtail.errors import ConfigError

try:  # numpy >= 2 keeps the implementation in numpy._core; importing numpy.core warns there
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray

# Arrays pickled under numpy 1.x name numpy.core, under numpy 2.x numpy._core; both mean the same objects.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "set"): set,  # protocol 2-3 pickles of a set name it (Python 2: __builtin__)
    ("__builtin__", "set"): set,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_module, "scalar")] = _multiarray.scalar


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """Protocol-2 pickles written by Python 3 rebuild bytes (a numpy scalar's raw value, as in DB-Loss's real
    class_split.pkl) through `_codecs.encode(text, "latin1")`; only that one call is allowed."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode: only (str, 'latin1') is allowed, got {type(text).__name__}, "
                                     f"{encoding!r}")
    return text.encode("latin1")


_ALLOWED[("_codecs", "encode")] = _latin1_bytes


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        # latin1: Python 2 str objects (CIFAR keys and the raw pixel bytes) decode byte for byte.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ConfigError(
                f"{self._path}: refusing to unpickle the global '{module}.{name}'; a CIFAR data file or DB-Loss "
                f"split file only contains numpy arrays, sets, lists, strings and numbers (this file is not one, or "
                f"was tampered with)"
            ) from None


def load_pickle(path: str | Path) -> Any:
    """Load a data pickle, allowing only numpy array and set reconstruction."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, path).load()
    except ConfigError:
        raise
    except Exception as exc:  # truncated or corrupt files fail in many ways (EOFError, UnpicklingError, ...)
        raise ConfigError(f"{path}: not a readable pickle (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
