"""The build: load, validate, fit and select, plan fusion, assemble, verify.

``build`` runs the stages in order, each named as it starts; ``fuser.ensemble.Ensemble``
holds the result and writes artifacts (``fuser.formats``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from fuser.assembly import EXIT_STAGE, assemble, output_specs
from fuser.conversion.units import ConversionOptions
from fuser.ensemble import Ensemble, serving_function
from fuser.errors import FuseError, FuseWarning, StageError, VerificationError, stage
from fuser.fitting import check_head, fit, score_cascade
from fuser.fusion.forms import failing_groups
from fuser.fusion.plan import FusionPlan, mode_of
from fuser.fusion.planner import plan_fusion
from fuser.heads import Head
from fuser.heads.calibration import calibrate
from fuser.heads.stages import check_order
from fuser.members import Member, parse_specs
from fuser.options import BuildOptions
from fuser.progress import Reporter
from fuser.recall import Records, load_or_recall, recorded
from fuser.reference import member_values
from fuser.tasks import infer_tasks, parse_task_option
from fuser.validate import Wiring, nonfinite_counts, nonfinite_problems, wire
from fuser.verify import Verifier
from runtime.manifest import TensorSpec

# Fewer validation rows than this per fitted weight make a learned head a guess.
_FEW_ROWS_PER_WEIGHT = 10


def build(members: Sequence[Any], head: str | Head = "mean", **options: Any) -> Ensemble:
    """Load ``members``, check they fit together, and fuse them into one verified model.

    Args:
        members: paths (``.keras``, ``.h5``, SavedModel directories), ``"name=path"``
            strings, or ``(name, path_or_keras_model)`` pairs.
        head: the combining head, one of ``fuser.heads.HEADS``: mean, weighted, median,
            geometric, vote, stack, cascade.
        weights: the ``weighted`` head's weights, one per member (normalised to sum to 1);
            for ``cascade``, the weights of its combination (default: the mean).
        cascade_order: the ``cascade`` head's stages by member name (default: cheapest
            first, measured on this machine); a fused group's members run as one stage.
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
        fusion: ``"auto"`` fuses same-architecture members into one computation where
            that is measured not to be slower (see ``fuser.fusion``), ``"on"`` wherever
            possible (``"stack"`` is its first spelling), ``"off"`` keeps every member a
            plain branch.
        jobs: members loaded at once (default: one per core, at most one per member), and
            large members converted to ONNX at once in worker processes (default: one per
            core; see ``fuser.conversion.units``).
        cache: keep members converted to ONNX in a cache, and a record of each member
            loaded (``fuser.members.records``), so that a rebuild loads and converts only the
            members that changed (the others are loaded only if something needs them; the
            fused Keras model is then assembled on first use, see ``Ensemble.model``).
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
    options = BuildOptions.from_keywords(head=head, **options)
    the_head, selection = options.checked()  # every option, before TensorFlow is imported
    reporter = Reporter(enabled=options.progress)
    specs = parse_specs(members)
    if the_head.routes:  # the names are known: before the slow part
        problems = check_order(the_head.order, [spec.name for spec in specs])
        if problems:
            raise FuseError(problems)
    if len(specs) == 1:
        _warn(
            reporter,
            f"The build has one member ({specs[0].name}): the artifact is that member "
            "alone, with fuser's verification, manifest and runtime.",
        )
    conversion = ConversionOptions(
        jobs=options.jobs,
        cache_dir=options.cache_dir,
        cache=options.cache,
        safe_mode=options.safe_mode,
        custom_objects=options.custom_objects,
        max_member_bytes=options.max_member_bytes,
    )
    records = Records.of(options, conversion, reporter)
    loaded, load_wall = load_or_recall(specs, options, records, reporter)
    load_sum = sum(member.load_seconds for member in loaded)
    with reporter.task("Matching the members' inputs and outputs, running them on a probe batch"):
        wiring = wire(loaded, input_name=options.input_name)
        output_names = [spec.name for spec in wiring.outputs]
        probe = _probe_batch(wiring.inputs, options.probe_batch)
        if records is not None:
            stale = records.stale(loaded, wiring, probe)
            loaded = records.load(loaded, stale, "their records hold another probe batch")
        probe_values = member_values(loaded, wiring, probe, what="the probe batch")
        nonfinite = nonfinite_counts(loaded, wiring, probe_values)
        if nonfinite and not options.allow_nonfinite:
            raise FuseError(nonfinite_problems(loaded, wiring, nonfinite))
        tasks = infer_tasks(
            loaded,
            wiring.output_order,
            output_names,
            probe_values,
            parse_task_option(options.task, output_names),
        )
    validation = fit_feeds = None
    if options.fit_data is not None:
        with reporter.task("Scoring the members on the validation data"):
            kept, wiring, the_head, probe_values, validation, fit_feeds = fit(
                loaded,
                wiring,
                the_head,
                tasks,
                probe_values,
                options.fit_data,
                selection,
                options.metric,
            )
        _warn_about_fitting(reporter, loaded, kept, the_head, validation)
        loaded = kept
    else:
        check_head(the_head, len(loaded), wiring, tasks)
    with reporter.task("Choosing which same-architecture members to fuse"):
        if records is not None:
            alike = records.alike(loaded, mode_of(options.fusion))
            loaded = records.load(loaded, alike, "other members may share their architecture")
            records.store(loaded, wiring, probe, probe_values)
        fusion = plan_fusion(loaded, wiring.input_order, wiring.output_order, options.fusion)
    if records is not None and fusion.groups:  # the fused groups are checked in TensorFlow
        loaded = records.load(loaded, recorded(loaded), "the fused groups are checked with them")
    fit_check = None
    if the_head.routes:
        with reporter.task("Calibrating the cascade: timing its stages, choosing thresholds"):
            notes = calibrate(
                the_head,
                loaded,
                wiring,
                fusion,
                metric=options.metric,
                build_tolerance=options.tolerance,
                source=validation["source"],
            )
        for line in notes:
            reporter.note(line)
        score_cascade(validation, the_head, tasks)
        fit_check = (fit_feeds, the_head.fitted["values"])
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
    kinds = {name: task.kind for name, task in tasks.items()}
    verifier = Verifier(
        wiring,
        the_head,
        kinds,
        probe,
        probe_values,
        fusion=fusion,
        tolerance=options.tolerance,
        uncertainty=options.uncertainty,
        expose_members=options.expose_members,
        fit_check=fit_check,
    )

    def assemble_now(members: list[Member]) -> tuple[list[Member], Any, Any, float]:
        if records is not None:
            members = records.load(members, recorded(members), "the fused Keras model needs them")
        model, function, error = fuse_and_verify(
            members, wiring, the_head, kinds, fusion, verifier, probe_values, options
        )
        return members, model, function, error

    model = function = error = outputs = None
    if recorded(loaded):  # assembled when an output or predict needs it: not for ONNX
        outputs = output_specs(
            wiring,
            the_head,
            len(loaded),
            tasks=kinds,
            uncertainty=options.uncertainty,
            expose_members=options.expose_members,
        )
        verifier.outputs = [spec.name for spec in outputs]
    else:
        with reporter.task("Fusing, compiling and verifying"):
            loaded, model, function, error = assemble_now(loaded)

    def assemble_later(members: list[Member]) -> tuple[list[Member], Any, Any, float]:
        with reporter.task("Loading the recorded members, fusing, compiling and verifying"):
            return assemble_now(members)

    ensemble = Ensemble(
        loaded,
        wiring,
        the_head,
        model=model,
        function=function,
        outputs=outputs,
        assemble=assemble_later,
        load=records.load if records is not None else None,
        tasks=tasks,
        verifier=verifier,
        fusion=fusion,
        options=options,
        verification={
            "probe_batch": options.probe_batch,
            "tolerance": options.tolerance,
            "max_abs_error": error,
        },
        validation=validation,
        nonfinite=kept_nonfinite if options.allow_nonfinite else None,
        build_info={
            "load_seconds": round(load_wall, 4),
            "load_seconds_sum": round(load_sum, 4),
            "members_from_records": [member.name for member in recorded(loaded)],
        },
        conversion=conversion,
        reporter=reporter,
    )
    for line in fusion.notes():
        reporter.note(line)
    reporter.note(
        "The fused Keras model is assembled only if an artifact needs it (.keras); "
        "every artifact is verified against the members' recorded outputs."
        if error is None
        else f"Fused model matches its members: max abs error {error:.2e} on a probe batch of "
        f"{options.probe_batch}."
    )
    return ensemble


def fuse_and_verify(
    members: Sequence[Member],
    wiring: Wiring,
    head: Head,
    tasks: dict[str, str],
    fusion: FusionPlan,
    verifier: Verifier,
    probe_values: dict[str, np.ndarray],
    options: BuildOptions,
) -> tuple[Any, Any, float]:
    """Assemble, compile and verify the fused model: the model the artifacts hold, its
    ``tf.function`` for TensorFlow, and its max abs error on the probe batch.

    A fused group whose form fails in TensorFlow, or disagrees with its members, is found
    by running each group on its own: under ``--fusion auto`` it becomes plain branches
    again (the plan records why) and the model is assembled anew; under ``--fusion on`` the
    build fails naming the group.
    """
    while True:
        try:
            with stage("fusing", "the members into one model"):
                model, checked_model = _models(
                    assemble(
                        members,
                        wiring,
                        head,
                        tasks=tasks,
                        uncertainty=options.uncertainty,
                        expose_members=options.expose_members,
                        fusion=fusion,
                    ),
                    head,
                )
            verifier.outputs = list(model.output)
            subject = "the fused model" + (" with XLA" if options.xla else "")
            with stage("compiling", subject):
                function = serving_function(model, wiring.inputs, jit_compile=options.xla)
                checked = function
                if checked_model is not model:
                    checked = serving_function(checked_model, wiring.inputs)
            with stage("verifying", "the fused model"):
                error = verifier.verify(
                    lambda feeds, function=checked: _run(function, wiring.inputs, feeds),
                    "The fused model",
                )
            return model, function, error
        except (StageError, VerificationError) as failure:
            failing = failing_groups(
                fusion, members, wiring, verifier.probe, probe_values, options.tolerance
            )
            if not failing:
                raise
            if fusion.mode != "auto":
                group, reason = failing[0]
                names = ", ".join(member.name for member in group.members)
                raise VerificationError(
                    f"The fused form of the group {names} {reason}; --fusion off (or auto) "
                    "keeps these members plain branches."
                ) from failure
            for group, reason in failing:
                fusion.demote(group, f"its fused form {reason} on this machine, so it stays plain.")


def _models(model: Any, head: Head) -> tuple[Any, Any]:
    """The model the artifacts hold, and the one the build checks (the same, but for a
    cascade without ``exit_stage`` in its outputs, whose routing is still checked)."""
    if not head.routes or head.exit_stage:
        return model, model
    import keras

    outputs = {name: value for name, value in model.output.items() if name != EXIT_STAGE}
    return keras.Model(model.inputs, outputs, name=model.name), model


def _run(function: Any, inputs: Sequence[TensorSpec], feeds: dict) -> dict[str, np.ndarray]:
    outputs = function(*(feeds[spec.name] for spec in inputs))
    return {name: value.numpy() for name, value in outputs.items()}


def _warn(reporter: Reporter, text: str) -> None:
    """A warning the build goes on after: a Python warning (``FuseWarning``) for callers,
    which the CLI prints as ``fuser: warning: ...``."""
    warnings.warn(text, FuseWarning, stacklevel=3)


def _warn_about_fitting(
    reporter: Reporter,
    given: Sequence[Member],
    kept: Sequence[Member],
    head: Head,
    validation: dict[str, Any],
) -> None:
    if len(given) > 1 and len(kept) == 1:
        _warn(
            reporter,
            f"Selection kept one member of {len(given)} ({kept[0].name}): the artifact is that "
            "member alone; the others did not improve the validation metric.",
        )
    if head.needs_fit:
        rows, weights = validation["rows"], head.fitted_parameters()
        if weights and rows < _FEW_ROWS_PER_WEIGHT * weights:
            _warn(
                reporter,
                f"The {head.name!r} head is fitted on {rows} validation rows for {weights} "
                f"weights (fewer than {_FEW_ROWS_PER_WEIGHT} rows per weight): its weights may "
                "fit the validation data rather than the task; use more validation rows.",
            )


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
