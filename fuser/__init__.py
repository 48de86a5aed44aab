"""fuser: compile N saved Keras/TensorFlow models into ONE fused, verified artifact.

    >>> import fuser
    >>> ensemble = fuser.build(["a.keras", "b.h5", "c_savedmodel"], head="mean")
    >>> ensemble.save("ensemble.onnx")

Importing fuser is cheap: TensorFlow is imported when a build starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fuser.errors import FuseError, FuseWarning, StageError, VerificationError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fuser.builder import build
    from fuser.ensemble import Ensemble
    from fuser.options import BuildOptions

# Imported on first use (PEP 562), so that ``fuser inspect`` and ``fuser --help``, which
# import this package, load none of the build's modules.
_LAZY = {"build": "fuser.builder", "Ensemble": "fuser.ensemble", "BuildOptions": "fuser.options"}

__all__ = [
    "BuildOptions",
    "Ensemble",
    "FuseError",
    "FuseWarning",
    "StageError",
    "VerificationError",
    "__version__",
    "build",
    "import_tensorflow",
]


def import_tensorflow() -> Any:
    """``import tensorflow`` without its C++ start-up chatter on stderr (``FUSER_TF_LOGS=1``
    shows it). Scripts that train members before a build can call it first."""
    from runtime.quiet import import_tensorflow as quietly

    return quietly()


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fuser' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
