"""TensorFlow for the build: imported once, quietly (``runtime.quiet``), and its loggers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from runtime.quiet import import_tensorflow


@contextlib.contextmanager
def python_logs_quiet(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the given Python loggers to ``level`` for a block, then restore them.

    TensorFlow and tf2onnx warn about their own deprecated internals on every ONNX
    conversion; users who imported TensorFlow themselves keep their logger settings.
    """
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


def tensorflow() -> Any:
    """``import tensorflow``, without the C++ start-up chatter on stderr."""
    return import_tensorflow()
