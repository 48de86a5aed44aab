"""The build: load, validate, fuse, compile, verify. ``build`` returns an ``Ensemble``."""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fuser import __version__
from fuser import cascade as cascade_lib
from fuser import uncertainty as uncertainty_lib
from fuser.errors import FuseError, StageError, VerificationError, stage
from fuser.fuse import EXIT_STAGE, assemble, failing_groups
from fuser.heads import CascadeHead, Head, WeightedHead, make_head
from fuser.members import Member, check_max_member_bytes, load_members, parse_specs
from fuser.onnx_units import ConversionOptions
from fuser.progress import Reporter
from fuser.selection import (
    Selection,
    check_metric,
    member_predictions,
    parse_selection,
    prepare_targets,
    read_fit_data,
    score,
    select_greedy,
    select_top,
)
from fuser.stack import FusionPlan, check_mode, plan_fusion
from fuser.tasks import Task, infer_tasks, parse_task_option
from fuser.validate import Plan, nonfinite_counts, nonfinite_problems, plan
from runtime import manifest as manifest_lib
from runtime._keras import native_grouped_convolutions
from runtime.inputs import prepare_feeds
from runtime.manifest import TensorSpec

DEFAULT_PROBE_BATCH = 8
DEFAULT_TOLERANCE = 1e-4


def build(
    members: Sequence[Any],
    head: str | Head = "mean",
    *,
    weights: Sequence[float] | None = None,
    cascade_order: Sequence[str] | None = None,
    cascade_tolerance: float | None = None,
    cascade_confidence: str | None = None,
    cascade_exit_stage: bool = False,
    task: str | dict[str, str] | None = None,
    fit_data: str | os.PathLike | dict[str, Any] | None = None,
    select: str | None = None,
    metric: str | None = None,
    uncertainty: bool = False,
    expose_members: bool = False,
    fusion: str = "auto",
    jobs: int | None = None,
    input_name: str | None = None,
    xla: bool = False,
    safe_mode: bool = True,
    custom_objects: dict[str, Any] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    max_member_bytes: int | None = None,
    probe_batch: int = DEFAULT_PROBE_BATCH,
    tolerance: float = DEFAULT_TOLERANCE,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> Ensemble:
    """Load ``members``, check they fit together, and fuse them into one verified model.

    Args:
        members: paths (``.keras``, ``.h5``, SavedModel directories), ``"name=path"``
            strings, or ``(name, path_or_keras_model)`` pairs.
        head: the combining head, one of ``fuser.heads.HEADS``: mean, weighted, median,
            geometric, vote, stack, cascade.
        weights: the ``weighted`` head's weights, one per member (normalised to sum to 1);
            for ``cascade``, the weights of its combination (default: the mean).
        cascade_order: the ``cascade`` head's stages by member name (default: cheapest
            first, measured on this machine); a stacked group's members run as one stage.
        cascade_tolerance: how much worse than the full ensemble the ``cascade`` may score
            on ``fit_data``, in the metric's units (default 0.001: for accuracy, one error
            per thousand rows).
        cascade_confidence: ``"max"`` (the largest probability, default) or ``"margin"``
            (the largest minus the second largest), what the cascade's thresholds compare.
        cascade_exit_stage: add an output ``exit_stage``, the stage each row left at.
        task: ``"probabilities"``, ``"logits"`` or ``"regression"`` for every output, or a
            dict output name -> task; inferred when not given.
        fit_data: validation data (an ``.npz`` path or a dict) with ``x``/``y``, or
            ``x_<input>``/``y_<output>`` for several; needed by ``stack`` and ``select``.
        select: ``"top:K"`` keeps the K best members on ``fit_data``; ``"greedy:K"`` runs K
            rounds of greedy forward selection and weighs members by their pick counts.
        metric: the selection metric: log_loss (classifiers' default), accuracy, mse
            (regressors' default) or mae.
        uncertainty: add ``std`` (and for classifiers ``entropy``, ``mutual_info``) outputs.
        expose_members: add a ``members`` output, ``(batch, members, ...)``.
        fusion: ``"auto"`` stacks same-architecture members into one computation where
            that is measured not to be slower (see ``fuser.stack``), ``"stack"`` wherever
            possible, ``"off"`` keeps every member a plain branch.
        jobs: members loaded at once (default: one per core, at most one per member), and
            large members converted to ONNX at once in worker processes (default: one per
            core; see ``fuser.onnx_units``).
        cache: keep members converted to ONNX in a cache, so that a rebuild converts only
            the members that changed.
        cache_dir: the cache's folder (default: ``$FUSER_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/fuser``, else ``~/.cache/fuser``).
        input_name: name of the fused input when members have one input each
            (default: the first member's input name).
        xla: compile the fused function with XLA.
        safe_mode: refuse members that carry arbitrary code (Keras ``safe_mode``).
        custom_objects: classes to deserialise Keras members with, for registered layers.
        max_member_bytes: the most one member may expand to in memory (a .keras zip's
            entries, HDF5 datasets, SavedModel variables), checked before anything parses
            it; default 4 GiB, or 4x the member's size on disk if larger. Its model config
            may take 1/64 of it, a SavedModel's saved_model.pb 1/4.
        probe_batch: rows of the probe batch the build verifies itself on.
        tolerance: largest allowed error (absolute, and relative to the value's size)
            between the fused model and the members run one by one.
        allow_nonfinite: build even when members give NaN or inf on the probe batch (the
            fused model must then give them in the same places); the manifest records it.
        progress: show progress on stderr.

    Raises:
        FuseError: a bad member, incompatible members, a member giving NaN or inf on the
            probe batch (unless ``allow_nonfinite``) or a bad option, naming each.
        VerificationError: the fused model disagrees with its members.
    """
    _check_options(
        jobs=jobs,
        probe_batch=probe_batch,
        tolerance=tolerance,
        fusion=fusion,
        allow_nonfinite=allow_nonfinite,
        max_member_bytes=max_member_bytes,
    )
    head = make_head(
        head,
        weights=weights,
        cascade_order=cascade_order,
        cascade_tolerance=cascade_tolerance,
        cascade_confidence=cascade_confidence,
        cascade_exit_stage=cascade_exit_stage,
    )
    selection = parse_selection(select)
    if head.routes:
        _check_routing_options(head, selection=selection, xla=xla, expose_members=expose_members)
    if (
        selection is not None
        and selection.strategy == "greedy"
        and head.name not in ("mean", "weighted", "cascade")
    ):
        raise FuseError(
            f"--select greedy:K weighs the members for the 'weighted' head; it cannot feed the "
            f"{head.name!r} head. Use --select top:K with --head {head.name}, or drop --head."
        )
    if (head.needs_fit or selection is not None) and fit_data is None:
        needs = f"the {head.name!r} head" if head.needs_fit else f"--select {select}"
        raise FuseError(f"{needs} needs validation data: pass --fit-data VAL.npz (arrays x, y).")
    reporter = Reporter(enabled=progress)
    specs = parse_specs(members)
    if head.routes:  # before the slow part: the names are known
        problems = cascade_lib.check_order(head.order, [spec.name for spec in specs])
        if problems:
            raise FuseError(problems)
    with reporter.task("Importing TensorFlow and loading members", total=len(specs)) as advance:
        loaded, load_wall = load_members(
            specs,
            jobs=jobs,
            safe_mode=safe_mode,
            custom_objects=custom_objects,
            max_member_bytes=max_member_bytes,
            on_loaded=lambda member: advance(member.name),
        )
    load_sum = sum(member.load_seconds for member in loaded)
    reporter.note(
        f"Loaded {len(loaded)} members in {load_wall:.2f} s "
        f"(sum of the single loads {load_sum:.2f} s, {jobs or min(len(loaded), os.cpu_count() or 1)} at once)."
    )
    wiring = plan(loaded, input_name=input_name)
    output_names = [spec.name for spec in wiring.outputs]
    probe = _probe_batch(wiring.inputs, probe_batch)
    probe_values = member_values(loaded, wiring, probe, what="the probe batch")
    nonfinite = nonfinite_counts(loaded, wiring, probe_values)
    if nonfinite and not allow_nonfinite:
        raise FuseError(nonfinite_problems(loaded, wiring, nonfinite))
    tasks = infer_tasks(
        loaded,
        wiring.output_order,
        output_names,
        probe_values,
        parse_task_option(task, output_names),
    )
    validation = None
    fit_feeds = None
    if fit_data is not None:
        with reporter.task("Scoring the members on the validation data"):
            loaded, wiring, head, probe_values, validation, fit_feeds = _fit(
                loaded, wiring, head, tasks, probe_values, fit_data, selection, metric
            )
    else:
        _check_head(head, len(loaded), wiring, tasks)
    with reporter.task("Choosing which same-architecture members to stack"):
        fusion_plan = plan_fusion(loaded, wiring.input_order, wiring.output_order, fusion)
    fit_check = None
    if head.routes:
        with reporter.task("Calibrating the cascade: timing its stages, choosing thresholds"):
            notes = cascade_lib.calibrate(
                head,
                loaded,
                wiring,
                fusion_plan,
                metric=metric,
                build_tolerance=tolerance,
                source=validation["source"],
            )
        for line in notes:
            reporter.note(line)
        _score_ensemble(validation, head, tasks)
        fit_check = (fit_feeds, head.fitted["values"])
    kept_nonfinite = {
        member.name: nonfinite[member.name] for member in loaded if member.name in nonfinite
    }  # --select may have dropped some members
    for member in loaded:
        if member.name in kept_nonfinite:
            found = sum(record["nan"] + record["inf"] for record in nonfinite[member.name].values())
            reporter.note(
                f"{member.describe()} gives {found} NaN or inf values on the probe batch; "
                "built anyway (--allow-nonfinite)."
            )
    with reporter.task("Fusing and compiling"):
        ensemble = Ensemble(
            loaded,
            wiring,
            head,
            tasks=tasks,
            uncertainty=uncertainty,
            expose_members=expose_members,
            fusion=fusion_plan,
            probe=probe,
            probe_values=probe_values,
            xla=xla,
            tolerance=tolerance,
            validation=validation,
            fit_check=fit_check,
            conversion=ConversionOptions(
                jobs=jobs,
                cache_dir=Path(cache_dir) if cache_dir is not None else None,
                cache=cache,
                safe_mode=safe_mode,
                custom_objects=custom_objects,
                max_member_bytes=max_member_bytes,
            ),
            nonfinite=kept_nonfinite if allow_nonfinite else None,
            build_info={
                "load_seconds": round(load_wall, 4),
                "load_seconds_sum": round(load_sum, 4),
            },
        )
    for line in ensemble.fusion.notes():
        reporter.note(line)
    reporter.note(
        f"Fused model matches its members: max abs error {ensemble.verification['max_abs_error']:.2e} "
        f"on a probe batch of {probe_batch}."
    )
    ensemble.reporter = reporter
    return ensemble


def _check_options(
    *,
    jobs: int | None,
    probe_batch: int,
    tolerance: float,
    fusion: str,
    allow_nonfinite: bool,
    max_member_bytes: int | None,
) -> None:
    problems = check_mode(fusion) + check_max_member_bytes(max_member_bytes)
    if not isinstance(allow_nonfinite, bool):
        problems.append(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}.")
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        problems.append(f"jobs must be a positive integer, got {jobs!r}.")
    if not isinstance(probe_batch, int) or isinstance(probe_batch, bool) or probe_batch < 1:
        problems.append(f"probe_batch must be a positive integer, got {probe_batch!r}.")
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        problems.append(f"tolerance must be a positive number, got {tolerance!r}.")
    if problems:
        raise FuseError(problems)


def _check_routing_options(
    head: Head, *, selection: Selection | None, xla: bool, expose_members: bool
) -> None:
    """What a routing head (``cascade``) cannot do, refused before any member is loaded."""
    problems = []
    if xla:
        problems.append(
            "--xla compiles fixed shapes, but the 'cascade' head sends a number of rows to each "
            "stage that depends on the data (XLA aborts on it); drop --xla."
        )
    if expose_members:
        problems.append(
            "--expose-members gives every member's output for every row, but the 'cascade' "
            "head runs only the members each row needs; drop --expose-members."
        )
    if selection is not None and selection.strategy == "greedy" and head.weights is not None:
        problems.append(
            "--weights and --select greedy:K both weigh the cascade's members; give one of them."
        )
    if problems:
        raise FuseError(problems)


def _score_ensemble(validation: dict[str, Any], head: CascadeHead, tasks: dict[str, Task]) -> None:
    """The cascade's and the full ensemble's validation scores, once it is calibrated."""
    name = head.fitted["output"]
    record = validation["outputs"][name]
    values, target, kind = head.fitted["values"], head.fitted["target"], tasks[name].kind
    full = CascadeHead(head.weights)
    full.stages, full.thresholds = [list(range(len(values)))], []
    record["ensemble"] = _manifest_score(
        score(head.reference(values, task=kind, output=name), target, kind, record["metric"])
    )
    record["full_ensemble"] = _manifest_score(
        score(full.reference(values, task=kind, output=name), target, kind, record["metric"])
    )


def _check_head(head: Head, n_members: int, wiring: Plan, tasks: dict[str, Task]) -> None:
    problems = head.problems(
        n_members=n_members,
        tasks={name: task.kind for name, task in tasks.items()},
        shapes={spec.name: spec.shape for spec in wiring.outputs},
    )
    if problems:
        raise FuseError(problems)


def member_values(
    members: Sequence[Member],
    wiring: Plan,
    feeds: dict[str, np.ndarray],
    *,
    rows: int = 4096,
    what: str = "its inputs",
) -> dict[str, np.ndarray]:
    """Each member run on its own: fused output name -> ``(members, rows, ...)`` float64.

    Raises:
        FuseError: a member fails on ``feeds`` (described by ``what``), naming it.
    """
    import tensorflow as tf

    per_output: dict[str, list[np.ndarray]] = {spec.name: [] for spec in wiring.outputs}
    total = len(next(iter(feeds.values())))
    for member in members:
        chunks: list[list[np.ndarray]] = []
        for start in range(0, total, rows):
            tensors = [
                tf.constant(feeds[name][start : start + rows])
                for name in wiring.input_order[member.name]
            ]
            try:
                chunks.append([np.asarray(value) for value in member.call(tensors)])
            except Exception as error:  # the member's own computation failed
                raise FuseError(
                    f"{member.describe()} fails when run on {what} ({type(error).__name__}, "
                    "--debug shows it); check that it runs on plain tensors of the shapes and "
                    "dtypes its signature declares (ragged and sparse inputs are not supported)."
                ) from error
        outputs = [np.concatenate(parts) for parts in zip(*chunks)]
        for slot, spec in enumerate(wiring.outputs):
            index = wiring.output_order[member.name][slot]
            per_output[spec.name].append(outputs[index].astype(np.float64))
    return {name: np.stack(values) for name, values in per_output.items()}


def _fit(
    members: list[Member],
    wiring: Plan,
    head: Head,
    tasks: dict[str, Task],
    probe_values: dict[str, np.ndarray],
    fit_data: Any,
    selection: Selection | None,
    metric: str | None,
) -> tuple[list[Member], Plan, Head, dict[str, np.ndarray], dict[str, Any], dict]:
    """Score the members on validation data, select among them, fit the head.

    Returns the kept members, their wiring, the head (greedy selection makes it a
    weighted one, or weighs a cascade), their probe values, the validation record for
    the manifest, and the validation inputs (fused input name -> array).
    """
    data = read_fit_data(fit_data, wiring.inputs, wiring.outputs)
    every_name = [member.name for member in members]
    try:
        feeds = prepare_feeds(wiring.inputs, data.inputs)
    except (ValueError, TypeError) as error:
        raise FuseError(f"The inputs of {data.source} do not fit the members: {error}") from None
    specs = {spec.name: spec for spec in wiring.outputs}
    targets = {
        name: prepare_targets(target, specs[name], tasks[name].kind, data.source)
        for name, target in data.targets.items()
    }
    values = member_values(members, wiring, feeds, what=f"the validation data {data.source}")
    metrics = {name: check_metric(metric, tasks[name].kind) for name in specs}
    scores = {
        name: [
            score(prediction, targets[name], tasks[name].kind, metrics[name])
            for prediction in member_predictions(values[name], tasks[name].kind)
        ]
        for name in specs
    }
    record: dict[str, Any] = {"source": data.source, "rows": data.rows, "outputs": {}}
    if selection is not None:
        if len(specs) > 1:
            raise FuseError(
                "--select scores members on one output; this ensemble has outputs "
                f"{', '.join(specs)}. Select on a one-output ensemble."
            )
        if selection.strategy == "top" and selection.size > len(members):
            raise FuseError(
                f"--select top:{selection.size} keeps more members than the {len(members)} given."
            )
        (name,) = specs
        kind = tasks[name].kind
        if selection.strategy == "top":
            kept = select_top(scores[name], selection.size, metrics[name])
            counts = [1 if index in kept else 0 for index in range(len(members))]
        else:
            counts = select_greedy(
                member_predictions(values[name], kind),
                targets[name],
                kind,
                metrics[name],
                selection.size,
            )
            kept = [index for index, count in enumerate(counts) if count]
            if head.routes:
                head.set_weights([counts[index] for index in kept])
            else:
                head = WeightedHead([counts[index] for index in kept])
        record["selection"] = {
            "strategy": selection.strategy,
            "size": selection.size,
            "metric": metrics[name],
            "picks": {member.name: count for member, count in zip(members, counts)},
            "kept": [members[index].name for index in kept],
        }
        dropped = {members[index].name for index in range(len(members)) if index not in kept}
        wiring = Plan(
            wiring.inputs,
            wiring.outputs,
            {key: value for key, value in wiring.input_order.items() if key not in dropped},
            {key: value for key, value in wiring.output_order.items() if key not in dropped},
        )
        values = {key: value[kept] for key, value in values.items()}
        probe_values = {key: value[kept] for key, value in probe_values.items()}
        members = [members[index] for index in kept]
    _check_head(head, len(members), wiring, tasks)
    for name in specs:
        if head.needs_fit:
            with stage("fitting", f"the {head.name} head on {data.source}"):
                head.fit(name, values[name], targets[name], tasks[name].kind)
        record["outputs"][name] = {
            "metric": metrics[name],
            "members": {
                member: _manifest_score(value) for member, value in zip(every_name, scores[name])
            },
            "ensemble": None,  # a cascade is scored once calibrated (_score_ensemble)
            "ensemble_is_in_sample": head.needs_fit,
        }
        if not head.routes:
            combined = head.reference(values[name], task=tasks[name].kind, output=name)
            record["outputs"][name]["ensemble"] = _manifest_score(
                score(combined, targets[name], tasks[name].kind, metrics[name])
            )
    return members, wiring, head, probe_values, record, feeds


class Ensemble:
    """A fused ensemble in memory: one Keras model, compiled, verified, ready to save.

    Attributes:
        model: the fused ``keras.Model`` (inputs by name, a dict of named outputs).
        members: the loaded members, in order; ``named_members`` maps name -> member.
        inputs, outputs: the fused signature (``runtime.TensorSpec``).
        manifest: the record every artifact carries (without the artifact's own part).
        verification: the probe batch check of the fused model.
        nonfinite: when the build allowed NaN and inf (``allow_nonfinite``), the counts
            each member gave on the probe batch (see ``fuser.validate.nonfinite_counts``);
            else None.
        routing_checks: for a cascade, what the last checks of its routing found, for the
            fused model and the last artifact verified (the manifest's
            ``verification.routing``).
    """

    def __init__(
        self,
        members: Sequence[Member],
        wiring: Plan,
        head: Head,
        *,
        tasks: dict[str, Task],
        probe: dict[str, np.ndarray],
        probe_values: dict[str, np.ndarray],
        uncertainty: bool = False,
        expose_members: bool = False,
        fusion: FusionPlan | None = None,
        xla: bool = False,
        tolerance: float = DEFAULT_TOLERANCE,
        validation: dict[str, Any] | None = None,
        fit_check: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
        conversion: ConversionOptions | None = None,
        nonfinite: dict[str, dict[str, dict[str, int]]] | None = None,
        build_info: dict[str, Any] | None = None,
    ) -> None:
        self.members = list(members)
        self.named_members = {member.name: member for member in self.members}
        self.head = head
        self.tasks = dict(tasks)
        self.inputs: tuple[TensorSpec, ...] = wiring.inputs
        self.xla = xla
        self.tolerance = tolerance
        self.reporter = Reporter(enabled=False)
        self.fusion = fusion or FusionPlan("off", [], {})
        self.probe = probe
        self.wiring = wiring
        self.uncertainty, self.expose_members = uncertainty, expose_members
        self.probe_values = probe_values  # each member's outputs on the probe batch
        self.conversion = conversion or ConversionOptions()
        # A cascade's answers depend on where each row leaves: they are checked against
        # every possible exit stage, and the routing itself, on the probe batch and on
        # the validation rows (``fuser.cascade.Expectation``).
        self._probe_routing = self._fit_routing = None
        self._fit_feeds: dict[str, np.ndarray] | None = None
        self.routing_checks: dict[str, dict[str, Any]] = {}
        if head.routes:
            (spec,) = wiring.outputs
            kind = self.tasks[spec.name].kind
            margin = head.margin  # rows this near a threshold may leave either side
            self._probe_routing = cascade_lib.expectation(
                head,
                probe_values[spec.name],
                task=kind,
                output=spec.name,
                uncertainty=uncertainty,
                margin=margin,
            )
            if fit_check is not None:
                self._fit_feeds, fit_values = fit_check
                self._fit_routing = cascade_lib.expectation(
                    head,
                    fit_values,
                    task=kind,
                    output=spec.name,
                    uncertainty=uncertainty,
                    margin=0.0,
                )
        self.reference = self._reference(
            wiring, probe_values, uncertainty=uncertainty, expose_members=expose_members
        )
        error = self._fuse(
            wiring, probe_values, uncertainty=uncertainty, expose_members=expose_members
        )
        self.verification = {
            "probe_batch": len(next(iter(probe.values()))),
            "tolerance": tolerance,
            "max_abs_error": error,
        }
        self.validation = validation
        self.nonfinite = nonfinite
        self._build_info = build_info or {}

    def _fuse(
        self,
        wiring: Plan,
        probe_values: dict[str, np.ndarray],
        *,
        uncertainty: bool,
        expose_members: bool,
    ) -> float:
        """Assemble, compile and verify the fused model; returns its max abs error.

        A stacked group whose form fails in TensorFlow, or disagrees with its members, is
        found by running each group on its own: under ``--fusion auto`` it becomes plain
        branches again (the plan records why) and the model is assembled anew; under
        ``--fusion stack`` the build fails naming the group.
        """
        while True:
            try:
                with stage("fusing", "the members into one model"):
                    self.model, self._checked_model = self._models(
                        assemble(
                            self.members,
                            wiring,
                            self.head,
                            tasks={name: task.kind for name, task in self.tasks.items()},
                            uncertainty=uncertainty,
                            expose_members=expose_members,
                            fusion=self.fusion,
                        )
                    )
                self.outputs = tuple(
                    TensorSpec(name, tuple(tensor.shape), "float32")
                    for name, tensor in self.model.output.items()
                )
                subject = "the fused model" + (" with XLA" if self.xla else "")
                with stage("compiling", subject):
                    self._function = self.serving_function(jit_compile=self.xla)
                    checked = self._function
                    if self._checked_model is not self.model:
                        checked = self.serving_function(model=self._checked_model)
                with stage("verifying", "the fused model"):
                    return self.verify(partial(self._run, checked), "The fused model")
            except (StageError, VerificationError) as failure:
                failing = failing_groups(
                    self.fusion, self.members, wiring, self.probe, probe_values, self.tolerance
                )
                if not failing:
                    raise
                if self.fusion.mode != "auto":
                    group, reason = failing[0]
                    names = ", ".join(member.name for member in group.members)
                    raise VerificationError(
                        f"The stacked form of the group {names} {reason}; --fusion off (or "
                        "auto) keeps these members plain branches."
                    ) from failure
                for group, reason in failing:
                    self.fusion.demote(
                        group, f"its stacked form {reason} on this machine, so it stays plain."
                    )

    def _models(self, model: Any) -> tuple[Any, Any]:
        """The model the artifacts hold, and the one the build checks (the same, but for a
        cascade without ``exit_stage`` in its outputs, whose routing is still checked)."""
        if not self.head.routes or self.head.exit_stage:
            return model, model
        import keras

        outputs = {name: value for name, value in model.output.items() if name != EXIT_STAGE}
        return keras.Model(model.inputs, outputs, name=model.name), model

    def serving_function(
        self, *, jit_compile: bool = False, target: str = "tensorflow", model: Any = None
    ) -> Any:
        """A ``tf.function`` with a fixed signature (dynamic batch) returning named outputs.

        ``target`` is who will run the traced graph: ``"tensorflow"`` (verification, the
        SavedModel) or ``"onnx"`` (the graph tf2onnx converts); see
        ``runtime._keras.native_grouped_convolutions``. ``model`` defaults to ``model``.
        """
        import tensorflow as tf

        model = self.model if model is None else model
        signature = [
            tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name)
            for spec in self.inputs
        ]

        @tf.function(input_signature=signature, jit_compile=jit_compile)
        def serve(*tensors):
            outputs = model(list(tensors), training=False)
            return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}

        # Traced now, once: stacked grouped convolutions must be plain TensorFlow ops.
        with native_grouped_convolutions(target):
            serve.get_concrete_function()
        return serve

    def predict(self, x: Any, *, as_dict: bool | None = None) -> Any:
        """Run the fused model: one array for one output, else a dict name -> array."""
        results = self._run(self._function, prepare_feeds(self.inputs, x))
        if as_dict or (as_dict is None and len(results) > 1):
            return results
        return results[self.outputs[0].name]

    @property
    def tensorflow_function(self) -> Any:
        """The fused model's ``tf.function`` as traced and verified for TensorFlow (with XLA
        when the build asked for it): what the SavedModel artifact serves."""
        return self._function

    def _run(self, function: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = function(*(feeds[spec.name] for spec in self.inputs))
        return {name: value.numpy() for name, value in outputs.items()}

    @property
    def switch_batch(self) -> int | None:
        """Up to this batch size the switched groups run stacked, above as plain branches;
        None without switched groups. (The ONNX artifact switches all of them here, at the
        smallest of their limits.)"""
        limits = [g.max_stacked_batch for g in self.fusion.groups if g.max_stacked_batch]
        return min(limits, default=None)

    def verify(self, run: Any, what: str) -> float:
        """``check`` ``run(feeds)`` on the probe batch, and with switched groups also on a
        batch on the other side of ``switch_batch``: both forms are verified. A cascade is
        also checked on every validation row, and its routing row by row; what those
        checks found goes to ``routing_checks`` (``fused_model`` or ``artifact``)."""
        tally = {"probe": 0, "fit": 0}
        error = self._check(run(self.probe), what, None, tally)
        limit = self.switch_batch
        if limit is not None:
            rows = len(next(iter(self.probe.values())))
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
        compared = fused or self.head.exit_stage
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
        members run one by one.

        Returns the max abs error. Raises ``VerificationError`` beyond tolerance.
        """
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
        if isinstance(expected, cascade_lib.Expectation):
            expected, otherwise = expected.expected(results, what)
            tally[rows_of] += otherwise
        worst = 0.0
        for spec in self.outputs:
            got = np.asarray(results[spec.name], dtype=np.float64)
            want = expected[spec.name]
            if got.shape != want.shape:
                raise VerificationError(
                    f"{what} returns output '{spec.name}' of shape {got.shape}, but the members "
                    f"give {want.shape}."
                )
            with np.errstate(invalid="ignore"):  # inf - inf where both are inf: not compared
                difference = np.abs(got - want)
            if not np.all(np.isfinite(got) == np.isfinite(want)):
                raise VerificationError(
                    f"{what} returns non-finite values in output '{spec.name}' where the members do not."
                )
            finite = np.isfinite(want)
            error = float(difference[finite].max()) if finite.any() else 0.0
            bound = self.tolerance * (1.0 + np.abs(want[finite]))
            if np.any(difference[finite] > bound):
                raise VerificationError(
                    f"{what} differs from its members by up to {error:.3g} on output "
                    f"'{spec.name}' (tolerance {self.tolerance:g}); the build is refused."
                )
            worst = max(worst, error)
        return worst

    def _reference(
        self,
        wiring: Plan,
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
            values, kind = probe_values[spec.name], self.tasks[spec.name].kind
            prediction = self.head.reference(values, task=kind, output=spec.name)
            reference[spec.name] = prediction
            for extra in uncertainty_lib.kinds(
                kind, uncertainty=uncertainty, expose_members=expose_members
            ):
                name = uncertainty_lib.extra_name(extra, spec.name, single)
                reference[name] = uncertainty_lib.reference(extra, values, prediction, kind)
        return reference

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest every artifact of this ensemble carries (artifact part excluded)."""
        return {
            "format": manifest_lib.FORMAT,
            "format_version": manifest_lib.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": _versions(),
            "members": [member.to_manifest() for member in self.members],
            "head": {"name": self.head.name, "params": self.head.params()},
            "tasks": {name: task.to_manifest() for name, task in self.tasks.items()},
            "validation": self.validation,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "fusion": {**self.fusion.to_manifest(), "xla": self.xla},
            "build": dict(self._build_info),
            "verification": {
                "fused_model": dict(self.verification),
                **self._nonfinite_record(),
                **({"routing": dict(self.routing_checks)} if self.routing_checks else {}),
            },
            "artifact": {},
        }

    def _nonfinite_record(self) -> dict[str, Any]:
        """For a build that allowed NaN and inf: the flag, and the counts per member."""
        if self.nonfinite is None:
            return {}
        values = {
            member: {output: dict(record) for output, record in outputs.items()}
            for member, outputs in self.nonfinite.items()
        }
        return {"nonfinite_allowed": True, "nonfinite_values": values}

    def save(
        self, path: str | os.PathLike, *, force: bool = False, opset: int | None = None
    ) -> Path:
        """Write one artifact (the path's form picks the format), verified, atomically.

        Raises:
            FuseError: the path exists and ``force`` is false, or the format cannot hold a member.
            VerificationError: the written artifact disagrees with the members.
        """
        from fuser import export

        return export.write(self, Path(path), force=force, opset=opset)


# The validation rows a cascade is checked on go through the model this many at a time.
_CHECK_ROWS = 4096


def _manifest_score(value: float) -> float | None:
    """A score as the manifest keeps it: JSON has no NaN or inf, so a non-finite one
    (a member giving them, built with ``allow_nonfinite``) is null."""
    return round(float(value), 6) if math.isfinite(value) else None


def _probe_batch(inputs: Sequence[TensorSpec], rows: int) -> dict[str, np.ndarray]:
    """Deterministic probe inputs: standard normal floats, small non-negative integers."""
    rng = np.random.default_rng(0)
    probe = {}
    for spec in inputs:
        shape = (rows, *[dim if dim is not None else 8 for dim in spec.shape[1:]])
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            probe[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            probe[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            probe[spec.name] = rng.integers(0, 2, shape).astype(dtype)
    return probe


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"fuser": __version__, "python": platform.python_version()}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
