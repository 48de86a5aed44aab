"""``--fusion auto``: fuse a group where that is measured not to be slower on this machine.

Which form is faster depends on the shapes and on the CPU (docs/fusion.md has the figures
of two CPUs; no fixed rule fitted both). So up to ``costs.MEASURE_MAX_BYTES`` of weights
both forms of a group are converted to ONNX and timed with ONNX Runtime
(``fuser.fusion.costs``):

- the fused form not slower at any batch size: the group is fused;
- faster at batch 1 but slower from some batch size on: both forms are kept behind a
  switch on the batch size, if that switch, timed too, is not slower at any batch size
  (``Group.max_fused_batch``; the group's weights are then in the artifact twice);
- otherwise the group stays plain, with the figures in the reason.

Above that size measuring would cost seconds and gigabytes, and a fixed rule decides:
dense groups are fused, groups with convolutions or pooling are not (slower at large
batches), nor groups over ``AUTO_MAX_BYTES`` (ONNX Runtime holds about 3x the weights).
"""

from __future__ import annotations

from fuser.errors import brief, library_of
from fuser.fusion import costs
from fuser.fusion.lowerings import CONVOLUTIONS, LAYERS, channelwise
from fuser.fusion.plan import Group
from fuser.fusion.steps import Graph, OpStep, Unsupported

# --fusion auto keeps a group with more weights than this plain (float32 bytes): past it,
# the speed gained stopped paying for the memory (docs/fusion.md).
AUTO_MAX_BYTES = 256_000_000


def keeps_plain(group: Group) -> str | None:
    """Why ``--fusion auto`` keeps ``group`` plain, or None to fuse it (maybe switched)."""
    size = sum(member.parameters for member in group.members) * 4
    if size > AUTO_MAX_BYTES:
        return (
            f"--fusion auto keeps groups with more than {AUTO_MAX_BYTES // 10**6} MB of weights "
            f"plain (this one: {size / 10**6:,.0f} MB): fused, ONNX Runtime holds about 3x "
            "the weights in memory and loads 3x slower, for no speed gain at that size; "
            "--fusion on fuses them."
        )
    if size <= costs.MEASURE_MAX_BYTES:
        try:
            measured = costs.measure(group)
        except (Unsupported, costs.FormsDisagree) as reason:
            return str(reason)
        except Exception as error:  # converting or timing either form failed
            where = library_of(error) or type(error).__name__
            return (
                "--fusion auto could not convert and time the two forms, so they stay plain "
                f"({where}: {brief(error)})"
            )
        group.measured = measured
        try:
            return _decide(group, measured)
        finally:
            measured.converted = None  # the two ONNX models, up to 2 x 32 MB
    spatial = _spatial_layer(group.graphs[0])
    if spatial is not None:
        return (
            f"--fusion auto keeps groups over {costs.MEASURE_MAX_BYTES // 10**6} MB with "
            f"{spatial} layers plain: fused, they were measured slower at large batches "
            "(ONNX Runtime's grouped convolution); --fusion on fuses them."
        )
    return None


def _decide(group: Group, measured: costs.Measurement) -> str | None:
    """Why ``group`` stays plain after its timing, or None to fuse it (maybe switched)."""
    if measured.fused_wins:
        return None
    losing = ", ".join(map(str, measured.losing_batches))
    slower = f"--fusion auto measured the fused form slower than plain branches at batch {losing}"
    if measured.fused_limit is not None:
        try:
            measured.switch = costs.measure_switch(group, measured)
        except costs.FormsDisagree as reason:
            return str(reason)
        except Exception as error:
            slower += f" and timing a switch between both forms failed ({brief(error)})"
        else:
            if not measured.switch_losing_batches:
                group.max_fused_batch = measured.fused_limit
                return None
            worse = ", ".join(map(str, measured.switch_losing_batches))
            slower += (
                f", and a switch to plain above batch {measured.fused_limit} was slower "
                f"than plain at batch {worse}"
            )
    return (
        f"{slower} (ONNX Runtime on this machine, fused vs plain: {measured.describe()}); "
        "--fusion on fuses them."
    )


def _spatial_layer(graph: Graph) -> str | None:
    """The kind of the first convolution or pooling layer of ``graph``, if any."""
    for step in graph.steps:
        kind = type(step.layer).__name__
        if isinstance(step, OpStep):
            continue
        if kind in CONVOLUTIONS or LAYERS[kind].lower is channelwise:
            return kind
    return None
