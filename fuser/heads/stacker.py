"""``--head stack``: the stacker, a meta-learner fitted at build time on validation data.

For classifiers, multinomial logistic regression on the members' log-probabilities with
one non-negative weight per member and a bias per class, ``softmax(sum_i w_i log p_i +
b)``, its L2 penalty chosen by 5-fold cross-validated log loss; for regressors, ridge
regression on the members' outputs (``RidgeCV``). Written into the graph as one ``Dense``
layer. (Not horizontal fusion, which ``fuser.fusion`` does.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fuser.errors import FuseError
from fuser.heads.base import Head
from fuser.heads.distributions import (
    REGRESSION,
    answer,
    log_distribution,
    np_answer,
    np_log_distribution,
    np_softmax,
)


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

    def fitted_parameters(self) -> int:
        """The free parameters fitted, over every output: per classifier output one weight
        per member and a bias per class; per regression output the ridge's coefficients."""
        count = 0
        for model in self.fitted.values():
            weights = model.get("member_weights")
            if weights is not None:
                count += len(weights) + len(model["bias"])
            else:
                count += int(np.size(model["kernel"])) + int(np.size(model["bias"]))
        return count

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
