"""TensorFlow imported quietly, for the artifacts it serves (SavedModel, ``.keras``) and
for the build.

TensorFlow logs through absl before any setting can reach it (``failed call to cuInit``
and the like on a machine without a GPU), so the stderr file descriptor is pointed at
/dev/null while it imports and creates its CPU device. Set ``FUSER_TF_LOGS=1`` to see
that output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any


def import_tensorflow() -> Any:
    """``import tensorflow``, without the C++ start-up chatter on stderr.

    TensorFlow logs through absl before any setting can reach it, so the stderr file
    descriptor is pointed at /dev/null while it imports and creates its CPU device.
    Set ``FUSER_TF_LOGS=1`` to see that output.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet = os.environ.get("FUSER_TF_LOGS") != "1"
    with _stderr_silenced() if quiet else contextlib.nullcontext():
        import tensorflow as tf

        tf.constant(0)  # creates the devices now, while stderr is quiet
    tf.get_logger().setLevel(logging.ERROR)
    return tf


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
