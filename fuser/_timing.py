"""Time ONNX models against each other in a fresh process, as the runtime serves them.

``fuser.costs`` runs this file as a script: the build process holds TensorFlow, whose
thread pools made ONNX Runtime there up to 2.7x slower than in a serving process, and
not alike for every model. Only numpy and onnxruntime are imported here.

Usage: ``python _timing.py REQUEST.json``, where the request names the models
(``{"models": {form: path}, "inputs": [{"name", "shape", "dtype"}], "batches": [...],
"seconds": s, "min_runs": n}``). Prints ``{"ms": {form: [fastest call per batch]}}``.
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
    # One session at a time: a second session's idle thread pool slowed the timed one
    # (up to 2x measured at batch 4096). Two rounds in opposite orders, so that drift
    # hits both forms alike; the minimum over all calls, because on a shared machine
    # other tenants only ever add time (medians of 0.3 s moved up to 2x between runs).
    for order in (forms, forms[::-1]):
        for form in order:
            session = onnxruntime.InferenceSession(
                request["models"][form], providers=["CPUExecutionProvider"]
            )
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
    print(json.dumps({"ms": best}))


if __name__ == "__main__":
    main(sys.argv[1])
