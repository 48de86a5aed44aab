"""Combining heads: how the members' outputs become the ensemble's answer.

Every head has two faces that must agree: ``combine`` builds it inside the fused Keras
graph (so every artifact format carries it), ``reference`` computes the same thing in
NumPy on the members' outputs (the build verifies one against the other). Both see the
members of one output stacked on axis 1 (graph: ``(batch, members, ...)``) or axis 0
(NumPy: ``(members, batch, ...)``).

Classification heads work on class distributions: members that output logits are turned
into probabilities first, and a one-column output (sigmoid or a single logit) is read as
the probability of the positive class. Their answer is always probabilities, in the
members' layout. Heads are built from built-in Keras layers and ``keras.ops`` only, so a
``.keras`` artifact loads in safe mode without registering any fuser class.

The ``cascade`` head is the exception: it routes rows, so each runs only the members it
needs, and is built around the members (``fuser.fuse.assemble``) as one registered layer,
``runtime._cascade.Cascade``, which the runtime imports before it loads a ``.keras``
artifact. Its NumPy face is ``np_route``; ``fuser.cascade`` calibrates it.

``HEADS`` declares the heads; ``make_head`` is the one place their options are checked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fuser.errors import FuseError

PROBABILITIES, LOGITS, REGRESSION = "probabilities", "logits", "regression"
TASKS = (PROBABILITIES, LOGITS, REGRESSION)
CLASSIFICATION = frozenset({PROBABILITIES, LOGITS})
# Probabilities are clipped here before a log: float32 softmax outputs reach exactly 0.
LOG_FLOOR = 1e-12


# -- class distributions, in the graph and in NumPy --------------------------------------


def distribution(values: Any, task: str) -> Any:
    """Graph: member outputs as class distributions on the last axis."""
    from keras import ops

    if values.shape[-1] == 1:
        positive = ops.sigmoid(values) if task == LOGITS else values
        return ops.concatenate([1.0 - positive, positive], axis=-1)
    return ops.softmax(values, axis=-1) if task == LOGITS else values


def log_distribution(values: Any, task: str) -> Any:
    """Graph: log-probabilities, computed from logits directly where members give logits."""
    from keras import ops

    if task == LOGITS:
        if values.shape[-1] == 1:
            return ops.concatenate([ops.log_sigmoid(-values), ops.log_sigmoid(values)], axis=-1)
        return ops.log_softmax(values, axis=-1)
    return ops.log(ops.maximum(distribution(values, task), LOG_FLOOR))


def answer(probabilities: Any, columns: int) -> Any:
    """Graph: a class distribution back in the members' layout (one column: P(positive))."""
    return probabilities[..., 1:] if columns == 1 else probabilities


def np_distribution(values: np.ndarray, task: str) -> np.ndarray:
    values = values.astype(np.float64)
    if values.shape[-1] == 1:
        positive = 1.0 / (1.0 + np.exp(-values)) if task == LOGITS else values
        return np.concatenate([1.0 - positive, positive], axis=-1)
    return np_softmax(values) if task == LOGITS else values


def np_log_distribution(values: np.ndarray, task: str) -> np.ndarray:
    values = values.astype(np.float64)
    if task == LOGITS:
        if values.shape[-1] == 1:
            return np.concatenate([-np.logaddexp(0, values), -np.logaddexp(0, -values)], axis=-1)
        shifted = values - values.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.log(np.maximum(np_distribution(values, task), LOG_FLOOR))


def np_answer(probabilities: np.ndarray, columns: int) -> np.ndarray:
    return probabilities[..., 1:] if columns == 1 else probabilities


def np_softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def member_axis_last(values: Any) -> Any:
    from keras import ops

    return ops.moveaxis(values, 1, -1)


# -- heads --------------------------------------------------------------------------------


class Head:
    """Base class. One head instance serves every output of the ensemble."""

    name: ClassVar[str]
    tasks: ClassVar[frozenset[str]] = frozenset(TASKS)
    needs_fit: ClassVar[bool] = False
    # A routing head runs only some members per row: ``fuser.fuse.assemble`` builds it
    # around the members (``runtime._cascade.Cascade``) instead of calling ``combine``.
    routes: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        """Parameters recorded in the manifest."""
        return {}

    def problems(self, *, n_members: int, tasks: dict[str, str], shapes: dict) -> list[str]:
        """What stops this head from combining these members (empty when it can)."""
        problems = []
        for output, task in tasks.items():
            if task not in self.tasks:
                allowed = " or ".join(sorted(self.tasks))
                problems.append(
                    f"The {self.name!r} head combines {allowed} outputs, but output "
                    f"{output!r} is {_task_phrase(task)}; choose another head, or --task if "
                    "the task was inferred wrongly."
                )
        return problems

    def fit(self, output: str, values: np.ndarray, target: np.ndarray, task: str) -> None:
        """Learn from validation data (heads with ``needs_fit``): values ``(members, rows, ...)``."""

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        """The combined Keras tensor of one output; ``values`` is ``(batch, members, ...)``."""
        raise NotImplementedError

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        """NumPy reference: ``values`` is ``(members, batch, ...)``."""
        raise NotImplementedError


class MeanHead(Head):
    """The arithmetic mean (soft voting): of the probabilities for classifiers."""

    name = "mean"

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        if task == REGRESSION:
            return ops.mean(values, axis=1)
        return answer(ops.mean(distribution(values, task), axis=1), values.shape[-1])

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        if task == REGRESSION:
            return values.astype(np.float64).mean(axis=0)
        return np_answer(np_distribution(values, task).mean(axis=0), values.shape[-1])


class WeightedHead(Head):
    """A weighted mean; weights are normalised to sum to one."""

    name = "weighted"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        if weights is None:
            raise FuseError(
                "The 'weighted' head needs weights: --weights 0.5,0.3,0.2 (one per member), or "
                "--select greedy:K with --fit-data to learn them."
            )
        self.weights = normalised_weights(weights)

    def params(self) -> dict[str, Any]:
        return {"weights": [round(float(weight), 10) for weight in self.weights]}

    def problems(self, *, n_members: int, tasks: dict[str, str], shapes: dict) -> list[str]:
        problems = super().problems(n_members=n_members, tasks=tasks, shapes=shapes)
        return problems + _weight_count_problems(self.weights, n_members)

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        import keras
        from keras import ops

        columns = values.shape[-1]
        if task != REGRESSION:
            values = distribution(values, task)
        # The weights travel as the kernel of a bias-free Dense layer over the member axis:
        # plain layer weights, which every artifact format stores and ONNX freezes.
        layer = keras.layers.Dense(1, use_bias=False, trainable=False, name=f"{output}_weights")
        combined = ops.squeeze(layer(member_axis_last(values)), axis=-1)
        layer.set_weights([self.weights.astype(np.float32)[:, None]])
        return combined if task == REGRESSION else answer(combined, columns)

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        columns = values.shape[-1]
        values = values.astype(np.float64)
        if task != REGRESSION:
            values = np_distribution(values, task)
        combined = np.tensordot(self.weights, values, axes=1)
        return combined if task == REGRESSION else np_answer(combined, columns)


class MedianHead(Head):
    """The element-wise median; for classifiers renormalised to a distribution."""

    name = "median"

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        columns = values.shape[-1]
        if task != REGRESSION:
            values = distribution(values, task)
        members = values.shape[1]
        # top_k sorts along the last axis and converts to every format (ONNX TopK).
        ordered, _ = ops.top_k(member_axis_last(values), k=members)
        middle = members // 2
        if members % 2:
            median = ordered[..., middle]
        else:
            median = (ordered[..., middle - 1] + ordered[..., middle]) / 2.0
        if task == REGRESSION:
            return median
        return answer(median / ops.sum(median, axis=-1, keepdims=True), columns)

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        columns = values.shape[-1]
        values = values.astype(np.float64)
        if task == REGRESSION:
            return np.median(values, axis=0)
        median = np.median(np_distribution(values, task), axis=0)
        return np_answer(median / median.sum(axis=-1, keepdims=True), columns)


class GeometricHead(Head):
    """The normalised geometric mean of probabilities: softmax of the mean log-probability."""

    name = "geometric"
    tasks = CLASSIFICATION

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        mean_log = ops.mean(log_distribution(values, task), axis=1)
        return answer(ops.softmax(mean_log, axis=-1), values.shape[-1])

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        mean_log = np_log_distribution(values, task).mean(axis=0)
        return np_answer(np_softmax(mean_log), values.shape[-1])


class VoteHead(Head):
    """Hard majority voting: each class's share of the members' votes.

    The argmax of the shares is the majority label, ties going to the lowest class index
    (scikit-learn's ``VotingClassifier(voting="hard")``); a member's own ties go to its
    lowest class index too (``argmax``).
    """

    name = "vote"
    tasks = CLASSIFICATION

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        probabilities = distribution(values, task)
        # One-hot of each member's argmax, ties to the lowest class, without argmax: Keras
        # lowers argmax with Bitcast ops that ONNX lacks. The first maximal entry is the
        # one where the running count of maximal entries reaches one.
        highest = ops.max(probabilities, axis=-1, keepdims=True)
        maximal = ops.cast(ops.greater_equal(probabilities, highest), "float32")
        votes = maximal * ops.cast(ops.equal(ops.cumsum(maximal, axis=-1), 1.0), "float32")
        return answer(ops.mean(votes, axis=1), values.shape[-1])

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        probabilities = np_distribution(values, task)
        classes = probabilities.shape[-1]
        votes = np.eye(classes)[np.argmax(probabilities, axis=-1)]
        return np_answer(votes.mean(axis=0), values.shape[-1])


class StackHead(Head):
    """A meta-learner on the members' outputs, fitted on validation data at build time.

    Classifiers: multinomial logistic regression on the members' log-probabilities with
    one weight per member, shared by all classes, plus a bias per class:
    ``softmax(sum_i w_i log p_i + b)``, ``w_i >= 0``. It is a learned logarithmic opinion
    pool (the ``geometric`` head is ``w_i = 1/n, b = 0``); with ``members + classes``
    parameters instead of ``members * classes**2`` it does not overfit a small validation
    set, and its L2 penalty is chosen by cross-validated log loss on that set alone.
    Regressors: ridge regression on the members' outputs (``RidgeCV``). Either way the
    fitted model becomes a plain ``Dense`` layer of the graph.
    """

    name = "stack"
    needs_fit = True

    def __init__(self) -> None:
        self.fitted: dict[str, dict[str, Any]] = {}

    def params(self) -> dict[str, Any]:
        return {
            output: {key: value for key, value in model.items() if key not in ("kernel", "bias")}
            for output, model in self.fitted.items()
        }

    def problems(self, *, n_members: int, tasks: dict[str, str], shapes: dict) -> list[str]:
        problems = super().problems(n_members=n_members, tasks=tasks, shapes=shapes)
        for output, shape in shapes.items():
            if len(shape) != 2:
                problems.append(
                    f"The 'stack' head takes outputs of shape (batch, features); output "
                    f"{output!r} has shape {shape}."
                )
        return problems

    def fit(self, output: str, values: np.ndarray, target: np.ndarray, task: str) -> None:
        if task == REGRESSION:
            self.fitted[output] = _fit_ridge(self._features(values, task), target)
        else:
            self.fitted[output] = _fit_pool(np_log_distribution(values, task), target)

    @staticmethod
    def _features(values: np.ndarray, task: str) -> np.ndarray:
        """``(rows, members * columns)``: log-probabilities for classifiers, else the values."""
        if task != REGRESSION:
            values = np_log_distribution(values, task)
        return np.moveaxis(values.astype(np.float64), 0, 1).reshape(values.shape[1], -1)

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        import keras

        model = self._model(output)
        columns = values.shape[-1]
        if task != REGRESSION:
            values = log_distribution(values, task)
        features = keras.layers.Flatten(name=f"{output}_stack_features")(values)
        layer = keras.layers.Dense(
            model["kernel"].shape[1],
            activation="softmax" if task != REGRESSION else "linear",
            name=f"{output}_stack",
        )
        combined = layer(features)
        layer.set_weights([model["kernel"].astype(np.float32), model["bias"].astype(np.float32)])
        return combined if task == REGRESSION else answer(combined, columns)

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        model = self._model(output)
        linear = self._features(values, task) @ model["kernel"] + model["bias"]
        if task == REGRESSION:
            return linear
        return np_answer(np_softmax(linear), values.shape[-1])

    def _model(self, output: str) -> dict[str, Any]:
        if output not in self.fitted:
            raise FuseError(
                "The 'stack' head must be fitted on validation data: pass --fit-data VAL.npz "
                "(fit_data= in Python)."
            )
        return self.fitted[output]


CONFIDENCES = ("max", "margin")


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a cascade routes rows, computed in NumPy from the members' outputs.

    ``combined`` is each stage's combined prediction (of the members run up to it),
    ``(stages, rows, classes)``, ``confidence`` its confidence, ``(stages, rows)``, and
    ``exit_stage`` the 1-based stage each row leaves at; ``prediction`` is the answer,
    in the members' layout.
    """

    combined: np.ndarray
    confidence: np.ndarray
    exit_stage: np.ndarray
    prediction: np.ndarray


def np_confidence(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """The confidence of class distributions on the last axis: the largest probability
    (``max``) or the largest minus the second largest (``margin``)."""
    if kind == "max":
        return probabilities.max(axis=-1)
    top = np.sort(probabilities, axis=-1)
    return top[..., -1] - top[..., -2]


def np_route(
    probabilities: np.ndarray,
    stages: Sequence[Sequence[int]],
    weights: np.ndarray,
    thresholds: Sequence[float | None],
    confidence: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cascade in NumPy, as ``runtime._cascade.Cascade`` computes it in the graph.

    ``probabilities`` is ``(members, rows, classes)``; ``stages`` lists each stage's
    members (indices), ``weights`` one weight per member. After each stage but the last,
    a row leaves unless its confidence is below the stage's threshold (so a NaN one
    leaves; ``None``: no row leaves there).

    Returns ``(combined, confidence, exit_stage)`` as ``Routing`` describes them.
    """
    running = np.zeros(probabilities.shape[1:])
    total = 0.0
    combined = []
    for members in stages:
        running = running + np.tensordot(weights[members], probabilities[members], axes=1)
        total += float(weights[members].sum())
        combined.append(running / total)
    combined = np.stack(combined)
    conf = np_confidence(combined, confidence)
    exit_stage = np.full(probabilities.shape[1], len(stages))
    running_rows = np.ones(probabilities.shape[1], dtype=bool)
    for number, threshold in enumerate(thresholds):
        if threshold is None:
            continue
        with np.errstate(invalid="ignore"):
            leaving = running_rows & ~(conf[number] < threshold)
        exit_stage[leaving] = number + 1
        running_rows &= ~leaving
    return combined, conf, exit_stage


class CascadeHead(Head):
    """A confidence cascade: each row runs the members it needs, cheapest first.

    Stage 1 (a member, or a stacked group of members) runs on every row; a row leaves
    as soon as the combined prediction of the members run so far (their mean, or their
    weighted mean with ``weights`` renormalised over them) is confident enough (its
    largest probability, or the margin between its two largest, at or above that
    stage's threshold); the rest go on; the last stage answers for every row left. The
    order of the stages and their thresholds are calibrated at build time on the
    validation data (``fuser.cascade``), to cost the least per row while keeping the
    validation metric within ``tolerance`` of the full ensemble's.

    In the graph the routing is ``runtime._cascade.Cascade``: rows are gathered into
    each stage and their answers scattered back, so rows that left cost nothing later.
    Classifiers with one output only.

    Args:
        weights: one weight per member (default: equal), normalised to sum to one.
        order: member names, the stages' order (default: cheapest first, as measured).
        tolerance: how much worse than the full ensemble the cascade may score on the
            validation data, in the metric's units (default ``DEFAULT_TOLERANCE``: one
            error per thousand rows for accuracy).
        confidence: ``max`` (default) or ``margin``.
        exit_stage: add an output ``exit_stage``, the stage each row left at.
        costs: member name -> cost per row, to use instead of timing the stages.
    """

    name = "cascade"
    tasks = CLASSIFICATION
    needs_fit = True
    routes = True
    DEFAULT_TOLERANCE = 0.001

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        *,
        order: Sequence[str] | None = None,
        tolerance: float | None = None,
        confidence: str | None = None,
        exit_stage: bool = False,
        costs: dict[str, float] | None = None,
    ) -> None:
        problems = []
        if tolerance is not None and (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, (int, float))
            or not math.isfinite(tolerance)
            or tolerance < 0
        ):
            problems.append(
                f"--cascade-tolerance must be a number of at least 0, in the metric's units "
                f"(for accuracy, 0.001 is one error per thousand rows); got {tolerance!r}."
            )
        if confidence is not None and confidence not in CONFIDENCES:
            problems.append(
                f"--cascade-confidence must be one of {', '.join(CONFIDENCES)}; got {confidence!r}."
            )
        if order is not None and (
            isinstance(order, str) or not all(isinstance(name, str) for name in order)
        ):
            problems.append(f"--cascade-order must be a list of member names; got {order!r}.")
        if not isinstance(exit_stage, bool):
            problems.append(f"cascade_exit_stage must be True or False, got {exit_stage!r}.")
        if costs is not None and not (
            isinstance(costs, dict)
            and all(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
                for value in costs.values()
            )
        ):
            problems.append(f"costs must map member names to positive numbers; got {costs!r}.")
        if problems:
            raise FuseError(problems)
        self.weights = None if weights is None else normalised_weights(weights)
        self.order = None if order is None else list(order)
        self.tolerance = self.DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
        self.confidence = confidence or "max"
        self.exit_stage = exit_stage
        self.costs = None if costs is None else dict(costs)
        # Set by fit (the validation data) and by fuser.cascade.calibrate.
        self.fitted: dict[str, Any] = {}
        self.stages: list[list[int]] | None = None
        self.thresholds: list[float | None] = []
        self.empty: list[str] = []  # per stage, runtime._cascade.EMPTY
        self.margin = 0.0
        self.calibration: dict[str, Any] = {}

    @property
    def combination(self) -> str:
        return "mean" if self.weights is None else "weighted"

    def set_weights(self, weights: Sequence[float]) -> None:
        """Weigh the members (greedy selection's pick counts); normalised to sum to one."""
        self.weights = normalised_weights(weights)

    def member_weights(self, members: int) -> np.ndarray:
        return np.full(members, 1.0 / members) if self.weights is None else self.weights

    def params(self) -> dict[str, Any]:
        return dict(self.calibration)

    def problems(self, *, n_members: int, tasks: dict[str, str], shapes: dict) -> list[str]:
        if len(tasks) > 1:
            return [
                "The 'cascade' head routes rows by the confidence of one output, but this "
                f"ensemble has outputs {', '.join(tasks)}; build it from one-output members."
            ]
        problems = []
        for output, task in tasks.items():
            if task not in self.tasks:
                problems.append(
                    f"The 'cascade' head routes rows by the confidence of a classifier's "
                    f"prediction, but output {output!r} is {_task_phrase(task)}; choose another "
                    "head, or --task if the task was inferred wrongly."
                )
        if n_members < 2:
            problems.append(
                f"The 'cascade' head needs at least 2 members (one stage each); got {n_members}."
            )
        if self.weights is not None:
            problems += _weight_count_problems(self.weights, n_members)
        return problems

    def fit(self, output: str, values: np.ndarray, target: np.ndarray, task: str) -> None:
        """Keep the validation data; ``fuser.cascade.calibrate`` uses it once the stages
        (members and stacked groups) are known."""
        self.fitted = {"output": output, "values": values, "target": target, "task": task}

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        raise FuseError(
            "The 'cascade' head runs inside the graph around the members "
            "(fuser.fuse.assemble), not on their stacked outputs."
        )

    def route(self, values: np.ndarray, task: str) -> Routing:
        """The routing of rows whose members' outputs are ``values`` ``(members, rows, ...)``."""
        stages = self._calibrated()
        probabilities = np_distribution(values, task)
        combined, conf, exit_stage = np_route(
            probabilities,
            stages,
            self.member_weights(len(values)),
            self.thresholds,
            self.confidence,
        )
        chosen = combined[exit_stage - 1, np.arange(len(exit_stage))]
        return Routing(combined, conf, exit_stage, np_answer(chosen, values.shape[-1]))

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        return self.route(values, task).prediction

    def _calibrated(self) -> list[list[int]]:
        if self.stages is None:
            raise FuseError(
                "The 'cascade' head must be calibrated on validation data: pass --fit-data "
                "VAL.npz (fit_data= in Python)."
            )
        return self.stages


POOL_PENALTIES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _fit_pool(log_probabilities: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Fit ``softmax(sum_i w_i log p_i + b)``; ``log_probabilities`` is ``(members, rows, classes)``.

    Returns the equivalent ``Dense`` kernel over the flattened ``(members, classes)``
    features (block-diagonal: ``kernel[i * classes + c, c] = w_i``) and bias.
    """
    features = np.moveaxis(log_probabilities, 0, 1)  # (rows, members, classes)
    members, classes = features.shape[1:]
    smallest_class = int(np.bincount(target, minlength=classes).min())
    folds = min(5, smallest_class)
    if folds >= 2:
        from sklearn.model_selection import StratifiedKFold

        splitter = StratifiedKFold(folds, shuffle=True, random_state=0)
        splits = list(splitter.split(features[:, 0, 0], target))
        losses = []
        for penalty in POOL_PENALTIES:
            held_out = []
            for train, test in splits:
                weights, bias = _solve_pool(features[train], target[train], penalty)
                held_out.append(_pool_log_loss(features[test], target[test], weights, bias))
            losses.append(float(np.mean(held_out)))
        penalty = POOL_PENALTIES[int(np.argmin(losses))]
    else:  # a class seen once: no stratified folds; a middle penalty
        penalty, losses, folds = 1e-2, [], 0
    weights, bias = _solve_pool(features, target, penalty)
    kernel = np.zeros((members * classes, classes))
    for member in range(members):
        kernel[member * classes : (member + 1) * classes] = weights[member] * np.eye(classes)
    return {
        "kernel": kernel,
        "bias": bias,
        "model": "multinomial logistic regression on log-probabilities, one weight per member",
        "member_weights": [round(float(weight), 6) for weight in weights],
        "class_bias": [round(float(value), 6) for value in bias],
        "l2": penalty,
        "cv_folds": folds,
        "cv_log_loss": round(min(losses), 6) if losses else None,
        "rows": len(target),
    }


def _solve_pool(features: np.ndarray, target: np.ndarray, penalty: float) -> tuple:
    from scipy.optimize import minimize

    rows, members, classes = features.shape
    onehot = np.eye(classes)[target]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = theta[:members], theta[members:]
        logits = np.einsum("rmc,m->rc", features, weights) + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        residual = np.exp(log_p) - onehot
        value = -(onehot * log_p).sum() / rows + penalty * (weights @ weights + bias @ bias)
        gradient = np.concatenate(
            [
                np.einsum("rc,rmc->m", residual, features) / rows + 2 * penalty * weights,
                residual.sum(axis=0) / rows + 2 * penalty * bias,
            ]
        )
        return value, gradient

    start = np.concatenate([np.full(members, 1.0 / members), np.zeros(classes)])
    bounds = [(0.0, None)] * members + [(None, None)] * classes
    solution = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return solution.x[:members], solution.x[members:]


def _pool_log_loss(features: np.ndarray, target: np.ndarray, weights, bias) -> float:
    logits = np.einsum("rmc,m->rc", features, weights) + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(target)), target].mean())


def _fit_ridge(features: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=np.logspace(-4, 4, 17))
    model.fit(features, target)
    kernel = np.atleast_2d(model.coef_).T
    return {
        "kernel": kernel,
        "bias": np.atleast_1d(model.intercept_),
        "model": "ridge regression",
        "alpha": float(model.alpha_),
        "rows": len(target),
    }


HEADS: dict[str, type[Head]] = {
    head.name: head
    for head in (
        MeanHead,
        WeightedHead,
        MedianHead,
        GeometricHead,
        VoteHead,
        StackHead,
        CascadeHead,
    )
}
# The cascade's own options (``fuser.build`` keyword, CLI flag).
CASCADE_OPTIONS = {
    "cascade_order": "--cascade-order",
    "cascade_tolerance": "--cascade-tolerance",
    "cascade_confidence": "--cascade-confidence",
    "cascade_exit_stage": "--cascade-exit-stage",
}


def make_head(
    head: str | Head,
    *,
    weights: Sequence[float] | None = None,
    cascade_order: Sequence[str] | None = None,
    cascade_tolerance: float | None = None,
    cascade_confidence: str | None = None,
    cascade_exit_stage: bool = False,
) -> Head:
    """The head named ``head`` configured with its options, or ``head`` itself if a Head.

    Raises:
        FuseError: an unknown head, or options that head does not take.
    """
    cascade = {
        "cascade_order": cascade_order,
        "cascade_tolerance": cascade_tolerance,
        "cascade_confidence": cascade_confidence,
        "cascade_exit_stage": cascade_exit_stage or None,
    }
    given = [CASCADE_OPTIONS[key] for key, value in cascade.items() if value is not None]
    name = head.name if isinstance(head, Head) else head
    if given and name != "cascade":
        raise FuseError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the 'cascade' "
            f"head, not {name!r}; pass --head cascade."
        )
    if isinstance(head, Head):
        if given:
            raise FuseError(f"Give {', '.join(given)} to the CascadeHead itself, not beside it.")
        return head
    if head not in HEADS:
        raise FuseError(f"Unknown head {head!r}; choose one of: {', '.join(HEADS)}.")
    if head == "weighted":
        return WeightedHead(weights)
    if head == "cascade":
        return CascadeHead(
            weights,
            order=cascade_order,
            tolerance=cascade_tolerance,
            confidence=cascade_confidence,
            exit_stage=bool(cascade_exit_stage),
        )
    if weights is not None:
        raise FuseError(
            f"--weights applies to the 'weighted' head (and 'cascade'), not {head!r}; pass "
            "--head weighted."
        )
    return HEADS[head]()


def _task_phrase(task: str) -> str:
    return {
        PROBABILITIES: "a classifier's probabilities",
        LOGITS: "a classifier's logits",
        REGRESSION: "a regression",
    }[task]


def _list(values: np.ndarray) -> str:
    return ", ".join(f"{value:g}" for value in np.atleast_1d(values))


def normalised_weights(weights: Sequence[float]) -> np.ndarray:
    """Finite, non-negative weights, not all zero, scaled to sum to one.

    Raises:
        FuseError: any other weights, naming them.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise FuseError(
            f"Weights must be finite, non-negative numbers, one per member; got {_list(weights)}."
        )
    if weights.sum() <= 0:
        raise FuseError(f"Weights must not all be zero; got {_list(weights)}.")
    return weights / weights.sum()


def _weight_count_problems(weights: np.ndarray, n_members: int) -> list[str]:
    if len(weights) == n_members:
        return []
    return [
        f"--weights gives {len(weights)} weights for {n_members} members; give one weight per "
        "member, in the members' order."
    ]
