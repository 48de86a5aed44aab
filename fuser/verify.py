"""The build verifies itself: the fused model and every artifact against the members.

The reference is computed in NumPy from the members' own outputs on the probe batch
(``fuser.reference.member_values``): the head's ``reference``, the extra outputs, or for a
cascade the answer of the stage each row leaves at. ``Verifier.verify(run, what)`` runs
the model (``run(feeds) -> {output: array}``) on the probe batch, and for groups switched
on the batch size also on a batch on the other side of the switch (both forms are then
checked); a cascade is checked on every validation row too, and its routing row by row.
Beyond tolerance (absolute, and relative to the value's size) it raises
``VerificationError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fuser import uncertainty as uncertainty_lib
from fuser.errors import VerificationError
from fuser.fusion.plan import FusionPlan
from fuser.heads import Head
from fuser.heads.calibration import Expectation, expectation
from fuser.validate import Wiring

# The validation rows a cascade is checked on go through the model this many at a time.
_CHECK_ROWS = 4096


class Verifier:
    """What a model of the ensemble must answer, and the check that it does.

    Attributes:
        reference: every output on the probe batch, computed in NumPy.
        outputs: the names of the outputs checked (set once the model is assembled).
        routing_checks: for a cascade, what the last checks of its routing found, for the
            fused model and the last artifact verified (the manifest's
            ``verification.routing``).
    """

    def __init__(
        self,
        wiring: Wiring,
        head: Head,
        tasks: dict[str, str],
        probe: dict[str, np.ndarray],
        probe_values: dict[str, np.ndarray],
        *,
        fusion: FusionPlan,
        tolerance: float,
        uncertainty: bool = False,
        expose_members: bool = False,
        fit_check: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.probe = probe
        self.probe_values = probe_values
        self.tolerance = tolerance
        self.fusion = fusion
        self.exit_stage_compared = bool(getattr(head, "exit_stage", False))
        self.outputs: list[str] = []
        self.routing_checks: dict[str, dict[str, Any]] = {}
        # A cascade's answers depend on where each row leaves: they are checked against
        # every possible exit stage, and the routing itself, on the probe batch and on
        # the validation rows (``fuser.heads.calibration.Expectation``).
        self._probe_routing: Expectation | None = None
        self._fit_routing: Expectation | None = None
        self._fit_feeds: dict[str, np.ndarray] | None = None
        if head.routes:
            (spec,) = wiring.outputs
            self._probe_routing = expectation(
                head,
                probe_values[spec.name],
                task=tasks[spec.name],
                output=spec.name,
                uncertainty=uncertainty,
                margin=head.margin,  # rows this near a threshold may leave either side
            )
            if fit_check is not None:
                self._fit_feeds, fit_values = fit_check
                self._fit_routing = expectation(
                    head,
                    fit_values,
                    task=tasks[spec.name],
                    output=spec.name,
                    uncertainty=uncertainty,
                    margin=0.0,
                )
        self.reference = self._reference(
            wiring,
            head,
            tasks,
            probe_values,
            uncertainty=uncertainty,
            expose_members=expose_members,
        )

    @property
    def probe_rows(self) -> int:
        return len(next(iter(self.probe.values())))

    @property
    def switch_batch(self) -> int | None:
        """Up to this batch size the switched groups run fused, above as plain branches;
        None without switched groups. (The ONNX artifact switches all of them here, at the
        smallest of their limits.)"""
        limits = [g.max_fused_batch for g in self.fusion.groups if g.max_fused_batch]
        return min(limits, default=None)

    def verify(self, run: Callable[[dict[str, np.ndarray]], dict], what: str) -> float:
        """Check ``run(feeds)`` as the module's docstring says; returns the max abs error."""
        tally = {"probe": 0, "fit": 0}
        error = self._check(run(self.probe), what, None, tally)
        limit = self.switch_batch
        if limit is not None:
            rows = self.probe_rows
            # The probe tiled past the limit, or cut down to it.
            other = np.resize(np.arange(rows), limit + 1) if rows <= limit else np.arange(limit)
            feeds = {name: value[other] for name, value in self.probe.items()}
            error = max(error, self._check(run(feeds), what, other, tally))
        if self._probe_routing is None:
            return error
        if self._fit_routing is not None:
            total = len(self._fit_routing.exit_stage)
            batches = [
                np.arange(start, min(start + _CHECK_ROWS, total))
                for start in range(0, total, _CHECK_ROWS)
            ]
            # And batches whose rows all leave at stage 1: every later stage sees no rows.
            first = np.flatnonzero(self._fit_routing.exit_stage == 1)[:64]
            if len(first):
                batches += [first, first[:1]]
            for rows in batches:
                feeds = {name: value[rows] for name, value in self._fit_feeds.items()}
                expected = self._fit_routing.subset(rows)
                where = f"{what} on the validation data"
                error = max(error, self._compare(run(feeds), where, expected, tally, "fit"))
        fused = what == "The fused model"
        compared = fused or self.exit_stage_compared
        self.routing_checks["fused_model" if fused else "artifact"] = {
            "exit_stages": "compared" if compared else "inferred from the prediction",
            "probe_rows": len(self._probe_routing.exit_stage),
            "probe_rows_near_a_threshold": int(
                (self._probe_routing.plausible().sum(axis=0) > 1).sum()
            ),
            "probe_rows_routed_otherwise": tally["probe"],
            "fit_rows": 0 if self._fit_routing is None else len(self._fit_routing.exit_stage),
            "fit_rows_routed_otherwise": tally["fit"],
        }
        return error

    def check(self, results: dict[str, np.ndarray], what: str, rows: Any = None) -> float:
        """Compare results on the probe batch (or on its ``rows``, in that order) with the
        members run one by one. Returns the max abs error; raises ``VerificationError``."""
        return self._check(results, what, rows, {"probe": 0, "fit": 0})

    def _check(self, results: dict, what: str, rows: Any, tally: dict[str, int]) -> float:
        if self._probe_routing is None:
            expected = self.reference
            if rows is not None:
                expected = {name: value[rows] for name, value in expected.items()}
            return self._compare(results, what, expected, tally, "probe")
        routing = self._probe_routing if rows is None else self._probe_routing.subset(rows)
        return self._compare(results, what, routing, tally, "probe")

    def _compare(
        self, results: dict, what: str, expected: Any, tally: dict[str, int], rows_of: str
    ) -> float:
        """The largest error of ``results`` against ``expected``: reference values by
        output name, or a cascade's ``Expectation`` (which picks, row by row, the values
        of the stage the row left at, after checking that stage)."""
        if isinstance(expected, Expectation):
            expected, otherwise = expected.expected(results, what)
            tally[rows_of] += otherwise
        worst = 0.0
        for name in self.outputs:
            got = np.asarray(results[name], dtype=np.float64)
            want = expected[name]
            if got.shape != want.shape:
                raise VerificationError(
                    f"{what} returns output '{name}' of shape {got.shape}, but the members "
                    f"give {want.shape}."
                )
            with np.errstate(invalid="ignore"):  # inf - inf where both are inf: not compared
                difference = np.abs(got - want)
            if not np.all(np.isfinite(got) == np.isfinite(want)):
                raise VerificationError(
                    f"{what} returns non-finite values in output '{name}' where the members do not."
                )
            finite = np.isfinite(want)
            error = float(difference[finite].max()) if finite.any() else 0.0
            bound = self.tolerance * (1.0 + np.abs(want[finite]))
            if np.any(difference[finite] > bound):
                raise VerificationError(
                    f"{what} differs from its members by up to {error:.3g} on output "
                    f"'{name}' (tolerance {self.tolerance:g}); the build is refused."
                )
            worst = max(worst, error)
        return worst

    def _reference(
        self,
        wiring: Wiring,
        head: Head,
        tasks: dict[str, str],
        probe_values: dict[str, np.ndarray],
        *,
        uncertainty: bool,
        expose_members: bool,
    ) -> dict[str, np.ndarray]:
        """Every output computed in NumPy from the members' own outputs on the probe batch."""
        if self._probe_routing is not None:  # a cascade: each row where it leaves
            routing = self._probe_routing
            rows = np.arange(len(routing.exit_stage))
            return {
                name: value[routing.exit_stage - 1, rows]
                for name, value in routing.candidates.items()
            }
        reference = {}
        single = len(wiring.outputs) == 1
        for spec in wiring.outputs:
            values, kind = probe_values[spec.name], tasks[spec.name]
            prediction = head.reference(values, task=kind, output=spec.name)
            reference[spec.name] = prediction
            for extra in uncertainty_lib.kinds(
                kind, uncertainty=uncertainty, expose_members=expose_members
            ):
                name = uncertainty_lib.extra_name(extra, spec.name, single)
                reference[name] = uncertainty_lib.reference(extra, values, prediction, kind)
        return reference
