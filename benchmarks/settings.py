"""The two modes of a run, quick and full: which member sets, and how long each measurement runs."""

from __future__ import annotations

import dataclasses

from benchmarks.measure import Budget


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides what a run measures and for how long.

    Attributes:
        mode: ``"quick"`` or ``"full"``.
        member_counts: family name -> the ensemble sizes N to measure.
        latency: the budget of the latency measurement at batch 1.
        throughput: the budget of each throughput measurement.
        throughput_batches: batch sizes of the throughput measurements.
        max_call_seconds: a throughput call that would take longer than this (estimated
            from the previous, smaller batch) is skipped, with a note in its row.
        cold_start_members: N of the member sets whose cold start is measured.
        cold_start_families: the families whose cold start is measured.
        cold_start_repeats: children started per approach (the median is kept).
        load_repeats: repeats of the sequential and parallel loading measurement.
        check_rows: rows of the batch every approach is checked on.
        tolerance: largest allowed absolute difference from the reference.
        seed: seed of the inputs.
    """

    mode: str
    member_counts: dict[str, tuple[int, ...]]
    latency: Budget
    throughput: Budget
    throughput_batches: tuple[int, ...] = (256, 4096)
    max_call_seconds: float = 30.0
    cold_start_members: int = 8
    cold_start_families: tuple[str, ...] = ("mlp", "cnn")
    cold_start_repeats: int = 3
    load_repeats: int = 3
    check_rows: int = 256
    tolerance: float = 1e-4
    seed: int = 0

    def with_member_counts(self, member_counts: dict[str, tuple[int, ...]]) -> Settings:
        """These settings for other member sets; cold start follows if its sets are gone."""
        families = tuple(
            family
            for family in self.cold_start_families
            if self.cold_start_members in member_counts.get(family, ())
        )
        return dataclasses.replace(self, member_counts=member_counts, cold_start_families=families)


FULL = Settings(
    mode="full",
    # About 12 minutes on 2 cores. Calls over max_call_seconds (the Keras predict loops at
    # batch 4096 from N = 16 on) are skipped with a note rather than stretching the run.
    # The CNN family stops at 16 members: at 32, the per-member tf.function baseline at
    # batch 4096 grew past this machine's 24 GB and was killed by the kernel.
    member_counts={"mlp": (1, 2, 4, 8, 16, 32), "cnn": (1, 2, 4, 8, 16)},
    latency=Budget(seconds=2.0, min_calls=5, max_calls=5000, warmup_calls=20, warmup_seconds=1.0),
    throughput=Budget(seconds=2.0, min_calls=2, max_calls=500, warmup_calls=2, warmup_seconds=0.5),
    max_call_seconds=10.0,
    cold_start_repeats=3,
    load_repeats=3,
)

QUICK = Settings(
    mode="quick",
    member_counts={"mlp": (1, 8), "cnn": (8,)},
    latency=Budget(seconds=0.4, min_calls=3, max_calls=1000, warmup_calls=5, warmup_seconds=0.3),
    throughput=Budget(seconds=0.3, min_calls=1, max_calls=200, warmup_calls=1, warmup_seconds=0.3),
    max_call_seconds=0.5,
    cold_start_families=("mlp",),
    cold_start_repeats=1,
    load_repeats=1,
)

MODES = {settings.mode: settings for settings in (FULL, QUICK)}
