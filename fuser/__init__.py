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
__all__ = ["Ensemble", "FuseError", "VerificationError", "__version__", "build"]

if TYPE_CHECKING:
    from fuser.ensemble import Ensemble


def build(members: Any, head: Any = "mean", **options: Any) -> Ensemble:
    """Fuse ``members`` into one verified ensemble; see ``fuser.ensemble.build``."""
    from fuser.ensemble import build as _build

    return _build(members, head, **options)


def __getattr__(name: str) -> Any:
    if name == "Ensemble":
        from fuser.ensemble import Ensemble

        return Ensemble
    raise AttributeError(f"module 'fuser' has no attribute {name!r}")
