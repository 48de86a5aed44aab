"""What the artifact writers read from a built ensemble.

``fuser.ensemble.Ensemble`` saves through the writers (``fuser.formats``), which convert
through ``fuser.conversion``; they depend on this description of a built ensemble, not on
the class that calls them. A new format's writer reads what it needs from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from fuser.conversion.unit import ConversionOptions
from fuser.fusion.plan import FusionPlan
from fuser.heads.base import Head
from fuser.members import Member
from fuser.progress import Reporter
from fuser.tasks import Task
from fuser.validate import Wiring
from runtime.manifest import TensorSpec


class Built(Protocol):
    """A fused, verified ensemble, as the writers see it."""

    model: Any  # the fused keras.Model: inputs by name, a dict of named outputs
    members: list[Member]
    wiring: Wiring
    head: Head
    tasks: dict[str, Task]
    fusion: FusionPlan
    inputs: tuple[TensorSpec, ...]  # the fused signature, batch dimension None
    outputs: tuple[TensorSpec, ...]
    xla: bool
    uncertainty: bool
    expose_members: bool
    tolerance: float  # how far an artifact may be from the members' own outputs
    conversion: ConversionOptions
    reporter: Reporter

    def load_recorded(self, which: list[Member], why: str) -> None:
        """Load members taken from their records after all (``why`` is said)."""

    @property
    def assembled(self) -> bool:
        """Whether the fused Keras model exists yet (a rebuild assembles it on first use)."""

    @property
    def probe(self) -> dict[str, np.ndarray]:
        """The probe batch every artifact is verified on."""

    @property
    def probe_values(self) -> dict[str, np.ndarray]:
        """Each member's own outputs on the probe batch, ``(members, rows, ...)``."""

    @property
    def switch_batch(self) -> int | None:
        """Up to this batch size switched groups run fused; None without them."""

    @property
    def tensorflow_function(self) -> Any:
        """The ``tf.function`` traced and verified for TensorFlow at build time."""

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest every artifact carries (without the artifact's own part)."""

    def serving_function(self, *, jit_compile: bool = False, target: str = "tensorflow") -> Any:
        """The fused model in a new ``tf.function`` traced for ``target``."""

    def verify(self, run: Callable[[dict[str, np.ndarray]], dict[str, Any]], what: str) -> float:
        """Check ``run(feeds) -> {output: array}`` against the members; the largest gap."""
