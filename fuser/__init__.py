"""fuser: compile N saved Keras/TensorFlow models into ONE fused, verified artifact.

    >>> import fuser
    >>> ensemble = fuser.build(["a.keras", "b.h5", "c_savedmodel"], head="mean")
    >>> ensemble.save("ensemble.onnx")

Importing fuser is cheap: TensorFlow is imported when a build starts.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Below __version__: the modules read it.
from fuser.build import build
from fuser.ensemble import Ensemble
from fuser.errors import FuseError, FuseWarning, StageError, VerificationError
from fuser.options import BuildOptions

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
