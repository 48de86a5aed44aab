"""Time ONNX models against each other in a fresh process, as the runtime serves them.

``fuser.fusion.costs`` runs this file as a script: the build process holds TensorFlow, whose
thread pools slow ONNX Runtime down there, and not alike for every model, so timings
taken in it would not be those of a serving process. Only numpy and onnxruntime are
imported here.

Usage: ``python _timing.py REQUEST.json``, where the request names the models
(``{"models": {form: path}, "inputs": [{"name", "shape", "dtype"}], "batches": [...],
"seconds": s, "min_runs": n}``). Prints ``{"ms": {form: [fastest call per batch]},
"error": {form: largest difference from the first form's answers, relative to 1 + their
size}}``: the forms must compute the same function, and a form ONNX Runtime computes
differently is found here, before it is timed as if it were right.
"""

import json
import math
import sys
import time

import numpy as np
import onnxruntime


def main(request_path: str) -> None:
    with open(request_path) as handle:
        request = json.load(handle)
    rng = np.random.default_rng(0)
    batches = {
        batch: {
            spec["name"]: rng.normal(size=(batch, *spec["shape"])).astype(spec["dtype"])
            for spec in request["inputs"]
        }
        for batch in request["batches"]
    }
    forms = list(request["models"])
    best: dict[str, list[float]] = {form: [math.inf] * len(batches) for form in forms}
    # The answers at the second batch size (the first is often one row), per form.
    checked = list(batches)[min(1, len(batches) - 1)]
    answers: dict[str, list[np.ndarray]] = {}
    # One session at a time: a second session's idle thread pool slows the timed one.
    # Two rounds in opposite orders, so that drift hits both forms alike; the minimum
    # over all calls, because on a shared machine other tenants only ever add time
    # (medians moved between runs, minima did not).
    for order in (forms, forms[::-1]):
        for form in order:
            session = onnxruntime.InferenceSession(
                request["models"][form], providers=["CPUExecutionProvider"]
            )
            if form not in answers:
                answers[form] = session.run(None, batches[checked])
            for index, feeds in enumerate(batches.values()):
                for _ in range(2):  # warm-up
                    session.run(None, feeds)
                deadline = time.perf_counter() + request["seconds"] / 2
                runs = 0
                while time.perf_counter() < deadline or runs < request["min_runs"]:
                    started = time.perf_counter()
                    session.run(None, feeds)
                    elapsed = (time.perf_counter() - started) * 1e3
                    best[form][index] = min(best[form][index], elapsed)
                    runs += 1
            del session
    first = answers[forms[0]]
    errors = {form: _error(first, answers[form]) for form in forms}
    print(json.dumps({"ms": best, "error": errors}))


def _error(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The largest ``|got - expected| / (1 + |expected|)`` over two forms' outputs (the
    build's tolerance is on that scale); inf where their shapes, or the places of NaN and
    inf, differ."""
    worst = 0.0
    for want, have in zip(expected, got):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        if want.shape != have.shape or not np.array_equal(np.isfinite(want), np.isfinite(have)):
            return math.inf
        finite = np.isfinite(want)
        if finite.any():
            scaled = np.abs(want[finite] - have[finite]) / (1.0 + np.abs(want[finite]))
            worst = max(worst, float(scaled.max()))
    return worst


if __name__ == "__main__":
    main(sys.argv[1])
