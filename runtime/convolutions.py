"""Keras helpers the runtime and the build share (imported only with TensorFlow)."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

TARGETS = ("tensorflow", "onnx")
_lock = threading.Lock()
_state = {"depth": 0, "original": None}
_target: contextvars.ContextVar[str] = contextvars.ContextVar(
    "fuser_convolution_target", default="tensorflow"
)


def current_target() -> str:
    """Who runs what is traced now: ``"tensorflow"`` or ``"onnx"`` (see below)."""
    return _target.get()


@contextlib.contextmanager
def native_grouped_convolutions(target: str = "tensorflow") -> Iterator[None]:
    """Trace grouped convolutions as TensorFlow's own ``Conv2D``, not as an XLA call.

    Keras compiles a grouped convolution (``groups > 1``) with XLA on the CPU, because
    TensorFlow once had no CPU kernel for it. TensorFlow 2.16+ runs it natively, and an
    XLA call can neither be converted to ONNX nor be served without XLA (nor does it
    accept a new batch size without recompiling). Within this context, grouped
    channels-last convolutions on 3-D and 4-D tensors trace as one ``Conv2D`` op; every
    other convolution goes to Keras unchanged.

    ``target`` says who runs the traced graph:

    - ``"tensorflow"`` (SavedModel, the build's own checks, the runtime's ``.keras``
      backend): the convolution's result passes through a ``Snapshot`` before its bias.
      Where oneDNN is off (TensorFlow's default on CPUs without AVX-512 VNNI, or
      ``TF_ENABLE_ONEDNN_OPTS=0``), TensorFlow's graph optimizer otherwise fuses
      ``Conv2D`` + ``BiasAdd`` (+ activation) into ``_FusedConv2D``, whose CPU kernel
      refuses groups ("Fused conv implementation does not support grouped
      convolutions"); the unfused grouped ``Conv2D`` runs everywhere. Measured against
      the other portable forms (split into one convolution per group and concatenated;
      a batched ``MatMul`` for 1x1 kernels), it was the fastest with oneDNN on and
      close to the best with it off (docs/architecture.md), so one form serves every CPU.
    - ``"onnx"``: the bare ``Conv2D``, which tf2onnx turns into an ONNX ``Conv`` with
      ``group`` and ONNX Runtime fuses with the bias and activation.

    Re-entrant and thread-safe: the first entry installs the replacement, the last exit
    restores Keras' own function; the target holds for this context (and thread) only.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
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
            outputs = tf.nn.convolution(
                inputs,
                kernel,
                strides,
                padding.upper(),
                data_format="NWC" if len(inputs.shape) == 3 else "NHWC",
                dilations=dilation_rate,
            )
            if _target.get() == "tensorflow":
                outputs = tf.raw_ops.Snapshot(input=outputs)  # not fusable with its bias
            return outputs
        return original(inputs, kernel, strides, padding, data_format, dilation_rate)

    with _lock:
        if _state["depth"] == 0:
            tf_nn.conv = conv
        _state["depth"] += 1
    token = _target.set(target)
    try:
        yield
    finally:
        _target.reset(token)
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                tf_nn.conv = original
