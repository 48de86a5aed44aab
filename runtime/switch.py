"""A layer that picks one of two equivalent sub-models by batch size (imports Keras).

Fusing a group of same-architecture members (``fuser.fusion``) can win at small
batches and lose at large ones, depending on the CPU. ``--fusion auto`` then keeps
both forms and lets the batch size choose at run time: in the exported graph this is
one ``cond`` (TensorFlow) or ``If`` (ONNX) node, so the artifact stays one model that
any server runs. Imported by the build and by the runtime before it loads a ``.keras``
artifact (the class must be registered for Keras' safe mode to rebuild it).

tf2onnx leaves the branches of a converted ``cond`` unoptimized (a branch runs slower
than the same graph alone), so the ONNX writer traces the model
once per form (``forced``) and joins the two converted graphs under one ``If``
(``fuser.conversion.switch``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

FORMS = ("small", "large")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fuser_switch", default=None)


@contextlib.contextmanager
def forced(form: str) -> Iterator[None]:
    """Within this context (and thread), every ``BatchSwitch`` runs ``form`` at any batch."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    token = _forced.set(form)
    try:
        yield
    finally:
        _forced.reset(token)


@keras.saving.register_keras_serializable(package="fuser")
class BatchSwitch(keras.layers.Layer):
    """``small(inputs)`` for batches of at most ``max_small_batch`` rows, else ``large(inputs)``.

    Both models take the same inputs and return the same outputs (a list); they differ
    only in how they compute them.
    """

    def __init__(self, small: Any, large: Any, max_small_batch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.small = small
        self.large = large
        self.max_small_batch = int(max_small_batch)

    def call(self, inputs: Any) -> Any:
        inputs = list(inputs)
        form = _forced.get()
        if form is not None:
            return self.small(inputs) if form == "small" else self.large(inputs)
        batch = ops.shape(inputs[0])[0]
        if isinstance(batch, int):  # eager: the batch size is known
            return self.small(inputs) if batch <= self.max_small_batch else self.large(inputs)
        return ops.cond(
            batch <= self.max_small_batch,
            lambda: self.small(inputs),
            lambda: self.large(inputs),
        )

    def compute_output_spec(self, inputs: Any) -> Any:
        return self.large.compute_output_spec(list(inputs))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "small": keras.saving.serialize_keras_object(self.small),
            "large": keras.saving.serialize_keras_object(self.large),
            "max_small_batch": self.max_small_batch,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchSwitch:
        config = dict(config)
        for key in ("small", "large"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
