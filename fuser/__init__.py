"""fuser: compile N saved Keras/TensorFlow models into ONE fused, verified artifact.

    >>> import fuser
    >>> ensemble = fuser.build(["a.keras", "b.h5", "c_savedmodel"], head="mean")
    >>> ensemble.save("ensemble.onnx")

Importing fuser is cheap: TensorFlow is imported when a build starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fuser.errors import FuseError, VerificationError

__version__ = "0.1.0"
__all__ = [
    "Ensemble",
    "FuseError",
    "VerificationError",
    "__version__",
    "build",
    "import_tensorflow",
]

if TYPE_CHECKING:
    from fuser.ensemble import Ensemble


def build(members: Any, head: Any = "mean", **options: Any) -> Ensemble:
    """Fuse ``members`` into one verified ensemble; see ``fuser.ensemble.build``."""
    from fuser.ensemble import build as _build

    return _build(members, head, **options)


def import_tensorflow() -> Any:
    """``import tensorflow`` without its C++ start-up chatter on stderr (``FUSER_TF_LOGS=1``
    shows it). Scripts that train members before a build can call it first."""
    from fuser._tf import tensorflow

    return tensorflow()


def __getattr__(name: str) -> Any:
    if name == "Ensemble":
        from fuser.ensemble import Ensemble

        return Ensemble
    raise AttributeError(f"module 'fuser' has no attribute {name!r}")
