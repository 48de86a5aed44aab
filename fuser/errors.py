"""Errors of the build side. Kept free of TensorFlow so the CLI can import them cheaply."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator


class FuseError(ValueError):
    """Bad input to a build: unusable members, incompatible signatures, bad options.

    Carries every problem found, so the user fixes them all in one round. ``str(error)``
    is the problems, one sentence per line.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StageError(FuseError):
    """A stage of the build failed inside TensorFlow, Keras, tf2onnx, ONNX or ONNX Runtime.

    Not bad input (the CLI exits with status 1): the message names the stage (loading,
    fusing, compiling, verifying, converting, timing), what it worked on, the library and
    its error in one line; the original exception is chained (``__cause__``).
    """

    def __init__(self, stage: str, subject: str, error: BaseException) -> None:
        self.stage, self.subject = stage, subject
        library = library_of(error)
        where = f"in {library}" if library else f"with {type(error).__name__}"
        text = brief(error)
        super().__init__(
            f"{stage[:1].upper()}{stage[1:]} {subject} failed {where}: {text}"
            f"{'' if text.endswith('.') else '.'}"
        )


class VerificationError(RuntimeError):
    """A fused model or an artifact disagrees with its members beyond tolerance."""


class FuseWarning(UserWarning):
    """The build went on, but something about it deserves a look (one member left after
    selection, a learned head fitted on few rows...). The CLI prints it on stderr."""


_LIBRARIES = (
    ("tensorflow", "TensorFlow"),
    ("keras", "Keras"),
    ("tf2onnx", "tf2onnx"),
    ("onnxruntime", "ONNX Runtime"),
    ("onnx", "ONNX"),
    ("google.protobuf", "protobuf"),
    ("sklearn", "scikit-learn"),
    ("runtime", "fuser's runtime"),
)


def library_of(error: BaseException) -> str | None:
    """The library an exception comes from, by its class's module (``TensorFlow``...);
    None for Python's own exceptions."""
    module = type(error).__module__ or ""
    for prefix, name in _LIBRARIES:
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None if module == "builtins" else module.split(".")[0]


def brief(error: BaseException) -> str:
    """An exception's message as one line: TensorFlow's graph-node annotations removed."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = re.sub(r"\{\{[^}]*\}\}", "", str(text))
    text = re.sub(r"\[\[.*?\]\]|\[Op:[^\]]*\]", "", text, flags=re.DOTALL)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def stage(name: str, subject: str = "") -> Iterator[None]:
    """Turn any failure of a library inside the block into one ``StageError``.

    ``FuseError`` and ``VerificationError`` pass unchanged: they already say what is wrong.
    """
    try:
        yield
    except (FuseError, VerificationError):
        raise
    except Exception as error:
        raise StageError(name, subject or "the ensemble", error) from error
