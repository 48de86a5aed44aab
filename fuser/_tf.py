"""Import TensorFlow once, quietly. Called where a build first needs it, never at import."""

from __future__ import annotations

import logging
import os
from typing import Any


def tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    return tf
