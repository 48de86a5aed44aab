"""Every way to serve an ensemble, behind one interface: ``setup()``, ``predict(x)``, ``close()``.

``setup`` does what a server does once before its first request (load, compile);
``predict`` answers one request with the ensemble's mean as a NumPy array; ``close``
releases sessions, thread pools and worker processes, so that one approach does not
slow down the next. The same classes run in the benchmark process and in the cold-start
children, so both measure the same code. This module imports neither TensorFlow nor
ONNX Runtime: each approach imports what it needs in ``setup``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from benchmarks.members import MemberSet


class Approach:
    """One way of serving a member set. Subclasses set ``name`` and ``description``."""

    name: ClassVar[str]
    description: ClassVar[str]
    skipped_reason: ClassVar[str | None] = None  # set while an approach does not exist yet

    def __init__(self, member_set: MemberSet) -> None:
        self.member_set = member_set

    def setup(self) -> None:
        """Load and compile, as a server would before its first request."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The ensemble's answer (mean of the members' outputs) for the batch ``x``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``setup`` acquired."""

    def tensorflow_imported(self) -> bool:
        """Whether serving imported TensorFlow (in this process or in its workers)."""
        return "tensorflow" in sys.modules


def _input_signature(tf: Any, member_set: MemberSet) -> list[Any]:
    return [tf.TensorSpec((None, *member_set.input_shape), tf.float32)]


def _quiet_tensorflow() -> Any:
    """Import TensorFlow as fuser does, without its start-up chatter and retracing warnings."""
    from fuser._tf import tensorflow

    return tensorflow()


class SeedPredictLoop(Approach):
    """The seed code: ``keras.models.load_model`` each member, average ``model.predict``."""

    name = "seed_predict_loop"
    description = "keras.models.load_model per member; np.mean([m.predict(x) for m in models])"

    def setup(self) -> None:
        _quiet_tensorflow()
        import keras

        self.models = [keras.models.load_model(path) for path in self.member_set.member_paths]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.mean([model.predict(x, verbose=0) for model in self.models], axis=0)

    def close(self) -> None:
        self.models = []


# The worker side of SeedMultiprocessing. Module level, so spawned workers can import it.
_WORKER_MODELS: list[Any] = []


def _load_worker_models(paths: list[str]) -> None:
    """Pool initializer: each worker loads every member, so it can serve any task."""
    _quiet_tensorflow()
    import keras

    _WORKER_MODELS[:] = [keras.models.load_model(path) for path in paths]


def _predict_member(index: int, x: np.ndarray) -> np.ndarray:
    return _WORKER_MODELS[index].predict(x, verbose=0)


def _worker_imported_tensorflow() -> bool:
    return "tensorflow" in sys.modules


class SeedMultiprocessing(Approach):
    """A ``multiprocessing.Pool`` whose workers load the members and predict, as people write it.

    A pool cannot route a task to a chosen worker, so each worker loads every member in
    its initializer and a request is ``pool.starmap`` over the members, averaged in the
    parent. Workers are spawned, not forked: forking a process that has TensorFlow's
    thread pools running can deadlock. One worker per core, at most one per member.
    """

    name = "seed_multiprocessing"
    description = (
        "multiprocessing.Pool (spawn, one worker per core) loading the members in its "
        "initializer; pool.starmap over members, np.mean"
    )

    def setup(self) -> None:
        self.workers = min(self.member_set.size, os.cpu_count() or 1)
        context = multiprocessing.get_context("spawn")
        paths = [str(path) for path in self.member_set.member_paths]
        self.pool = context.Pool(self.workers, initializer=_load_worker_models, initargs=(paths,))

    def predict(self, x: np.ndarray) -> np.ndarray:
        tasks = [(index, x) for index in range(self.member_set.size)]
        return np.mean(self.pool.starmap(_predict_member, tasks), axis=0)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def tensorflow_imported(self) -> bool:
        return self.pool.apply(_worker_imported_tensorflow)


class PerMemberTfFunction(Approach):
    """The strong TensorFlow baseline: each member in its own ``tf.function``, averaged."""

    name = "per_member_tf_function"
    description = (
        "each member as model(x, training=False) in its own tf.function with an "
        "input_signature; outputs averaged in NumPy"
    )

    def setup(self) -> None:
        tf = self.tf = _quiet_tensorflow()
        import keras

        signature = _input_signature(tf, self.member_set)
        self.functions = [
            _member_function(tf, keras.models.load_model(path, compile=False), signature)
            for path in self.member_set.member_paths
        ]

    def predict(self, x: np.ndarray) -> np.ndarray:
        tensor = self.tf.constant(x)
        return np.mean([function(tensor).numpy() for function in self.functions], axis=0)

    def close(self) -> None:
        self.functions = []


def _member_function(tf: Any, model: Any, signature: list[Any]) -> Any:
    @tf.function(input_signature=signature)
    def serve(x):
        return model(x, training=False)

    return serve


class PerMemberOnnxRuntime(Approach):
    """One ONNX Runtime session per member, averaged in NumPy (a Triton-style ensemble)."""

    name = "per_member_onnxruntime"
    description = (
        "one onnxruntime.InferenceSession per member (default SessionOptions, CPU); "
        "outputs averaged in NumPy"
    )

    def setup(self) -> None:
        import onnxruntime

        self.sessions = [
            onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for path in self.member_set.member_onnx_paths
        ]
        self.input_names = [session.get_inputs()[0].name for session in self.sessions]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.mean(
            [
                session.run(None, {input_name: x})[0]
                for session, input_name in zip(self.sessions, self.input_names)
            ],
            axis=0,
        )

    def close(self) -> None:
        self.sessions = []


class FusedTfFunction(Approach):
    """The fused Keras model (the ``.keras`` artifact) called in one ``tf.function``.

    This is what ``Ensemble.serving_function()`` does; loading the artifact instead of
    rebuilding the ensemble makes the cold start that of a server given the artifact.
    """

    name = "fused_tf_function"
    description = (
        "the fused .keras artifact (keras.models.load_model, safe mode) in one tf.function "
        "with an input_signature"
    )
    jit_compile: ClassVar[bool] = False

    def setup(self) -> None:
        tf = self.tf = _quiet_tensorflow()
        import keras

        model = keras.models.load_model(
            self.member_set.fused_keras_path, compile=False, safe_mode=True
        )

        @tf.function(
            input_signature=_input_signature(tf, self.member_set), jit_compile=self.jit_compile
        )
        def serve(x):
            outputs = model([x], training=False)
            return next(iter(outputs.values())) if isinstance(outputs, dict) else outputs

        self.function = serve

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.function(self.tf.constant(x)).numpy()

    def close(self) -> None:
        self.function = None


class FusedXla(FusedTfFunction):
    """The same fused function compiled with XLA (``jit_compile=True``)."""

    name = "fused_xla"
    description = "the fused .keras artifact in one tf.function with jit_compile=True (XLA)"
    jit_compile = True


class FusedOnnx(Approach):
    """The fused ONNX artifact through fuser's runtime: NumPy and ONNX Runtime, no TensorFlow."""

    name = "fused_onnx"
    description = (
        "the fused .onnx artifact, plain graph (--fusion off), through "
        "runtime.load(...).predict(x) (one session, default SessionOptions, CPU)"
    )

    def artifact(self) -> Path:
        return self.member_set.fused_onnx_path

    def setup(self) -> None:
        import runtime

        self.model = runtime.load(self.artifact())

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)

    def close(self) -> None:
        self.model = None


class FusedOnnxStacked(FusedOnnx):
    """The fused ONNX artifact with same-architecture members stacked (horizontal fusion)."""

    name = "fused_onnx_stacked"
    description = (
        "the fused .onnx artifact with same-architecture members stacked (--fusion on), "
        "through runtime.load(...).predict(x)"
    )

    def artifact(self) -> Path:
        return self.member_set.fused_stacked_onnx_path


APPROACHES: dict[str, type[Approach]] = {
    approach.name: approach
    for approach in (
        SeedPredictLoop,
        SeedMultiprocessing,
        PerMemberTfFunction,
        PerMemberOnnxRuntime,
        FusedTfFunction,
        FusedXla,
        FusedOnnx,
        FusedOnnxStacked,
    )
}
BASELINES = (
    "seed_predict_loop",
    "seed_multiprocessing",
    "per_member_tf_function",
    "per_member_onnxruntime",
)
STRONG_BASELINES = ("per_member_tf_function", "per_member_onnxruntime")
