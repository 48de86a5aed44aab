"""Side-by-side benchmarks: every way to serve an ensemble, on the same members and inputs.

    python -m benchmarks --quick          # about two minutes, into benchmarks/quick/
    python -m benchmarks                  # the full run, into benchmarks/results/

One module per job: ``members`` (the member families and their files), ``artifacts``
(fuser builds of the fused and per-member ONNX artifacts), ``approaches`` (one class per
way of serving, with ``setup``/``predict``/``close``), ``measure`` (latency, throughput,
loading, correctness), ``cold_start`` (fresh processes, parent and child side),
``machine`` (what the numbers were measured on), ``suite`` (the run, start to end),
``report`` (``results.json`` and ``RESULTS.md``) and ``plots`` (PNG figures).

Importing this package is cheap: TensorFlow and ONNX Runtime are imported by the
approaches that need them, so a cold-start child serving the fused ONNX artifact never
imports TensorFlow.
"""
