"""Run an artifact on the probe batch in a fresh process (``fuser.formats.writer`` starts it).

Usage: ``python -m fuser.formats._check ARTIFACT PROBE.npz ANSWERS.npz``: opens ARTIFACT with
the runtime's own backend, as a server would, runs it on the arrays of PROBE.npz and
writes its outputs to ANSWERS.npz. An error ends the process with a non-zero status and
one line on stderr saying what went wrong.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(artifact: str, probe: str, answers: str) -> int:
    import numpy as np

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from runtime.backends import open_backend

    with np.load(probe, allow_pickle=True) as stored:  # written by the build: string inputs
        feeds = {name: stored[name] for name in stored.files}
    backend = open_backend(Path(artifact), read_manifest=False)
    outputs = backend.run(feeds)
    np.savez(answers, **{name: np.asarray(value) for name, value in outputs.items()})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(*sys.argv[1:]))
    except Exception as error:  # one line for the build, which names the artifact
        print(f"{type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
