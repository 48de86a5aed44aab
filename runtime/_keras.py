"""Keras helpers the runtime and the build share (imported only with TensorFlow)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_state = {"depth": 0, "original": None}


@contextlib.contextmanager
def native_grouped_convolutions() -> Iterator[None]:
    """Trace grouped convolutions as TensorFlow's own ``Conv2D``, not as an XLA call.

    Keras compiles a grouped convolution (``groups > 1``) with XLA on the CPU, because
    TensorFlow once had no CPU kernel for it. TensorFlow 2.16+ runs it natively, and an
    XLA call can neither be converted to ONNX nor be served without XLA (nor does it
    accept a new batch size without recompiling). Within this context, grouped
    channels-last convolutions on 3-D and 4-D tensors trace as one ``Conv2D`` op, which
    tf2onnx turns into an ONNX ``Conv`` with ``group``; every other convolution goes to
    Keras unchanged. Re-entrant and thread-safe: the first entry installs the
    replacement, the last exit restores Keras' own function.
    """
    from keras.src.backend.tensorflow import nn as tf_nn

    with _lock:
        if _state["depth"] == 0:
            _state["original"] = tf_nn.conv
        original = _state["original"]

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        import tensorflow as tf
        from keras.src import backend

        grouped = inputs.shape[-1] != kernel.shape[-2]
        channels_last = backend.standardize_data_format(data_format) == "channels_last"
        if grouped and channels_last and len(inputs.shape) in (3, 4):
            return tf.nn.convolution(
                inputs,
                kernel,
                strides,
                padding.upper(),
                data_format="NWC" if len(inputs.shape) == 3 else "NHWC",
                dilations=dilation_rate,
            )
        return original(inputs, kernel, strides, padding, data_format, dilation_rate)

    with _lock:
        if _state["depth"] == 0:
            tf_nn.conv = conv
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                tf_nn.conv = original
