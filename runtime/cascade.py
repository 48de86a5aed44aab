"""A layer that routes each row through a confidence cascade of stages (imports Keras).

A cascade runs its first stage (a member, or a fused group of members) on every row,
combines the probabilities of the members run so far, and lets a row leave as soon as
that combined prediction is confident enough (its largest probability, or the margin
between its two largest, at or above the stage's threshold). The rows left go on to the
next stage; the last stage answers for every row still there.

Rows are routed inside the graph, so a batch of any size is split among the stages in
one call and a later stage runs only on the rows that reached it. Per stage: ``where``
on the rows whose confidence is below the threshold (TensorFlow ``Where``, ONNX
``NonZero``), ``gather_nd`` of their inputs, running sums and origins (``GatherNd``,
ONNX ``GatherND``), and one ``tensor_scatter_nd_update`` of the answers of the rows it
ran into the batch's answers (``TensorScatterUpdate``, ONNX ``ScatterND``), each row's
answer overwritten until it leaves. TensorFlow ops are used directly, not ``keras.ops``:
``keras.ops.take`` wraps every gather in a negative-index fix-up, eight more ONNX nodes
each, which made the routing several times larger and slower.

A stage that no row reached costs next to nothing: TensorFlow skips it (a ``cond``),
ONNX Runtime runs it on zero rows, or on one padded row where it refuses zero (``_run``
says why each).

Imported by the build and by the runtime before it loads a ``.keras`` artifact: the
class must be registered for Keras' safe mode to rebuild it. Its thresholds, weights
and options travel in the layer's config; its stages are nested Keras models.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from runtime.convolutions import current_target

CONFIDENCES = ("max", "margin")
TASKS = ("probabilities", "logits")
EMPTY = ("run", "pad")  # how ONNX runs a stage no row reached: on zero rows, or on one


@keras.saving.register_keras_serializable(package="fuser")
class Cascade(keras.layers.Layer):
    """Route rows through ``stages``; answer each row from the stages it ran.

    Args:
        stages: Keras models, each from the shared inputs (a list) to the raw outputs of
            its members, ``(batch, members of the stage, columns)``.
        weights: per stage, one weight per member; a row's answer is the weighted mean
            of the probabilities of the members it ran (weights renormalised over them).
        thresholds: one per stage but the last: a row leaves after that stage when the
            confidence of its combined prediction is at or above it; ``None``: no row
            leaves there.
        task: ``probabilities`` or ``logits`` (turned into probabilities first); a
            one-column output is the probability (or logit) of the positive class.
        confidence: ``max`` (the largest probability) or ``margin`` (the largest minus
            the second largest).
        member_order: for ``keep_members``, the position of each stage's members (in
            stage order) in the ensemble's member order.
        keep_members: also return every member's probabilities in member order, zeros
            where a row did not run it, ``(batch, members, classes)``, and which members
            each row ran, ``(batch, members)``, as 1.0 and 0.0.
        empty: per stage, how a graph traced for ONNX runs it when no row reached it:
            ``run`` on zero rows, or ``pad`` to one row of zeros (see ``_run``).

    Returns (from ``call``): ``[prediction, exit_stage]`` and with ``keep_members`` also
    ``[probabilities, ran]``: the prediction in the members' layout (probabilities), the
    1-based stage each row left at, as float32.
    """

    def __init__(
        self,
        stages: list[Any],
        weights: list[list[float]],
        thresholds: list[float | None],
        *,
        task: str = "probabilities",
        confidence: str = "max",
        member_order: list[int] | None = None,
        keep_members: bool = False,
        empty: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(stages) < 2:
            raise ValueError(f"a cascade needs at least 2 stages, got {len(stages)}")
        if len(weights) != len(stages) or len(thresholds) != len(stages) - 1:
            raise ValueError(
                "give one list of weights per stage, and a threshold per stage but the last"
            )
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
        self.stages = list(stages)
        self.stage_weights = [[float(weight) for weight in stage] for stage in weights]
        self.thresholds = [None if value is None else float(value) for value in thresholds]
        self.task = task
        self.confidence = confidence
        count = sum(len(stage) for stage in self.stage_weights)
        self.member_order = list(range(count)) if member_order is None else list(member_order)
        if sorted(self.member_order) != list(range(count)):
            raise ValueError(f"member_order must order the {count} members, got {member_order}")
        self.keep_members = bool(keep_members)
        self.empty = ["run"] * len(self.stages) if empty is None else list(empty)
        if len(self.empty) != len(self.stages) or not set(self.empty) <= set(EMPTY):
            raise ValueError(f"empty must give one of {EMPTY} per stage, got {empty!r}")

    # -- the routing ---------------------------------------------------------------------

    def call(self, inputs: Any) -> list[Any]:
        feeds = list(inputs)
        rows = None  # (rows, 1): where the rows still running came from; None: every row
        running = None  # sum of weight * probabilities over the stages run so far
        answers = None  # (batch, classes + 1): each row's answer and exit stage so far
        total = 0.0
        member_blocks = []
        for number in range(len(self.stages)):
            weights = self.stage_weights[number]
            probabilities = self._run(number, feeds)
            if self.keep_members:
                member_blocks.append((rows, probabilities))
            running = self._add(running, probabilities, weights)
            total += sum(weights)
            combined = running if total == 1.0 else running / total
            # The answer and, in one more column, the stage: one scatter per stage.
            answer = tf.pad(combined, [[0, 0], [0, 1]], constant_values=float(number + 1))
            # Each row's answer is overwritten until it leaves.
            answers = answer if rows is None else tf.tensor_scatter_nd_update(answers, rows, answer)
            if number == len(self.stages) - 1:
                break
            if self.thresholds[number] is None:
                continue  # no row leaves here: every row goes on, nothing to gather
            # The rows that stay: a confidence below the threshold (a NaN one leaves:
            # its answer is NaN whatever runs after). ``where`` with one argument is
            # ONNX's NonZero, ``gather_nd`` and ``tensor_scatter_nd_update`` its GatherND
            # and ScatterND, all on (rows, 1) indices.
            staying = tf.where(self._confidence(combined) < self.thresholds[number])
            rows = staying if rows is None else tf.gather_nd(rows, staying)
            feeds = [tf.gather_nd(tensor, staying) for tensor in feeds]
            running = tf.gather_nd(running, staying)
        outputs = [self._layout(answers[:, :-1]), answers[:, -1]]
        if self.keep_members:
            outputs += self._members(member_blocks, outputs[1])
        return outputs

    def _run(self, number: int, feeds: list[Any]) -> Any:
        """Stage ``number``'s member probabilities on ``feeds``, ``(rows, members, classes)``.

        A stage may see no rows. Traced for TensorFlow, a ``cond`` then skips it: its
        oneDNN grouped convolution fails on an empty batch. Traced for ONNX, a ``cond``
        (an ``If``) would make the stage slower when it runs: ONNX Runtime fuses its
        MatMul and Add into a Gemm that cannot prepack weights from outside the branch.
        So there the stage runs on zero rows, a near-free pass, or, where ONNX Runtime refuses
        an empty batch (``empty`` is ``"pad"``: a fused group, whose dense layers are
        convolutions along the batch), on one row of zeros whose answer is dropped.
        """
        stage = self.stages[number]
        count = tf.shape(feeds[0])[0]
        if current_target() == "onnx":
            if self.empty[number] == "run":
                return self._probabilities(stage(feeds))
            missing = 1 - tf.minimum(count, 1)  # one row when there is none
            padded = [
                tf.pad(tensor, [[0, missing]] + [[0, 0]] * (len(tensor.shape) - 1))
                for tensor in feeds
            ]
            return self._probabilities(stage(padded))[:count]
        members = stage.outputs[0].shape[1]
        return tf.cond(
            count > 0,
            lambda: self._probabilities(stage(feeds)),
            lambda: tf.zeros((0, members, self._classes)),
        )

    @staticmethod
    def _add(running: Any, probabilities: Any, weights: list[float]) -> Any:
        """``running`` plus the stage's weighted probabilities (``running`` None: none yet)."""
        if len(weights) == 1:
            share = tf.squeeze(probabilities, axis=1)
            if weights[0] != 1.0:
                share = share * weights[0]
        elif len(set(weights)) == 1:
            share = tf.reduce_sum(probabilities, axis=1)
            if weights[0] != 1.0:
                share = share * weights[0]
        else:
            share = tf.reduce_sum(probabilities * tf.constant(weights)[None, :, None], axis=1)
        return share if running is None else running + share

    @property
    def _columns(self) -> int:
        """Columns of the members' output (one: the positive class of a binary task)."""
        return int(self.stages[0].outputs[0].shape[-1])

    @property
    def _classes(self) -> int:
        return 2 if self._columns == 1 else self._columns

    def _probabilities(self, values: Any) -> Any:
        """Member outputs as class distributions, ``(rows, members, classes)``, float32."""
        values = tf.cast(values, tf.float32)
        if self._columns == 1:
            positive = tf.sigmoid(values) if self.task == "logits" else values
            return tf.concat([1.0 - positive, positive], axis=-1)
        return tf.nn.softmax(values, axis=-1) if self.task == "logits" else values

    def _confidence(self, combined: Any) -> Any:
        if self.confidence == "max":
            return tf.reduce_max(combined, axis=-1)
        top = tf.math.top_k(combined, k=2).values
        return top[:, 0] - top[:, 1]

    def _layout(self, probabilities: Any) -> Any:
        """Back to the members' layout: a one-column output is P(positive)."""
        return probabilities[:, 1:] if self._columns == 1 else probabilities

    def _members(self, blocks: list, exit_stage: Any) -> list[Any]:
        """Every member's probabilities in member order (zeros where not run), and 1.0
        where a row ran the member, else 0.0."""
        batch = tf.shape(exit_stage, out_type=tf.int64)[0]
        placed, stage_of = [], []
        for number, (rows, probabilities) in enumerate(blocks):
            members = len(self.stage_weights[number])
            if rows is None:
                placed.append(probabilities)
            else:
                shape = tf.stack([batch, members, self._classes])
                placed.append(tf.scatter_nd(rows, probabilities, shape))
            stage_of += [float(number + 1)] * members
        values = tf.concat(placed, axis=1)
        inverse = sorted(range(len(self.member_order)), key=self.member_order.__getitem__)
        if inverse != list(range(len(inverse))):
            values = tf.gather(values, inverse, axis=1)
        stage_of = tf.constant([[stage_of[index] for index in inverse]])
        ran = tf.cast(exit_stage[:, None] >= stage_of, tf.float32)
        return [values, ran]

    # -- Keras plumbing ------------------------------------------------------------------

    def compute_output_spec(self, inputs: Any) -> list[Any]:
        batch = next(iter(inputs)).shape[0]
        columns = self._columns
        classes = 2 if columns == 1 else columns
        specs = [
            keras.KerasTensor((batch, columns), dtype="float32"),
            keras.KerasTensor((batch,), dtype="float32"),
        ]
        if self.keep_members:
            members = len(self.member_order)
            specs += [
                keras.KerasTensor((batch, members, classes), dtype="float32"),
                keras.KerasTensor((batch, members), dtype="float32"),
            ]
        return specs

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "stages": [keras.saving.serialize_keras_object(stage) for stage in self.stages],
            "weights": self.stage_weights,
            "thresholds": self.thresholds,
            "task": self.task,
            "confidence": self.confidence,
            "member_order": self.member_order,
            "keep_members": self.keep_members,
            "empty": self.empty,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Cascade:
        config = dict(config)
        config["stages"] = [
            keras.saving.deserialize_keras_object(stage) for stage in config["stages"]
        ]
        return cls(**config)
