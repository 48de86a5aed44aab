"""Turning what a caller passes into the named, typed arrays an artifact expects."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.manifest import TensorSpec, format_shape


def prepare_feeds(inputs: Sequence[TensorSpec], x: Any) -> dict[str, np.ndarray]:
    """Check ``x`` against the input specs and return ``{input name: contiguous array}``.

    ``x`` is an array (or nested list) for a one-input model; a dict keyed by input name
    or a sequence in input order for several inputs. Float64 is cast to float32 and ints
    to floats where the model expects floats; nothing lossy is done silently. NaN and
    inf are passed on as they are.

    Raises:
        ValueError: wrong inputs, rank, shape, or differing batch sizes.
        TypeError: non-numeric values, floats where the model expects integers,
            integers outside the range of the model's integer dtype, or finite numbers
            beyond the range of its float dtype (which casting would make inf).
    """
    names = [spec.name for spec in inputs]
    if len(inputs) == 1:
        if isinstance(x, Mapping):
            if list(x) != names:
                raise ValueError(
                    f"Expected the one input {names}, received keys {_sorted_keys(x)}."
                )
            x = x[names[0]]
        values = [x]
    elif isinstance(x, Mapping):
        unknown = _sorted_keys(set(x) - set(names))
        missing = [name for name in names if name not in x]
        if unknown or missing:
            raise ValueError(f"Expected inputs {names}; missing {missing}, unknown {unknown}.")
        values = [x[name] for name in names]
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) == len(names):
        values = list(x)
    else:
        raise ValueError(
            f"This model has {len(names)} inputs {names}: pass a dict keyed by input name or "
            f"a sequence of {len(names)} arrays, not {type(x).__name__}."
        )
    feeds = {spec.name: _conform(spec, value) for spec, value in zip(inputs, values)}
    batches = {name: value.shape[0] for name, value in feeds.items()}
    if len(set(batches.values())) > 1:
        raise ValueError(f"All inputs must have the same batch size, received {batches}.")
    return feeds


def _conform(spec: TensorSpec, value: Any) -> np.ndarray:
    expected = np.dtype(spec.dtype)
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Input '{spec.name}' could not be read as an array ({error}); "
            f"expected shape {format_shape(spec.shape)} of {expected}."
        ) from None
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"Input '{spec.name}' expects numbers ({expected}), received an array of "
            f"dtype {array.dtype}."
        )
    if expected.kind in "iu" and array.dtype.kind == "f":
        raise TypeError(
            f"Input '{spec.name}' expects integers ({expected}), received {array.dtype}; "
            "cast explicitly if the values are whole numbers."
        )
    if array.ndim != len(spec.shape) or any(
        want is not None and want != got for want, got in zip(spec.shape[1:], array.shape[1:])
    ):
        raise ValueError(
            f"Input '{spec.name}' expects shape {format_shape(spec.shape)}, "
            f"received {format_shape(array.shape)}."
        )
    if (
        expected.kind in "iu"
        and array.dtype.kind in "iu"
        and array.size
        and not np.can_cast(array.dtype, expected)
    ):
        # A plain cast would wrap out-of-range integers around without a word.
        low, high, bounds = int(array.min()), int(array.max()), np.iinfo(expected)
        if low < bounds.min or high > bounds.max:
            raise TypeError(
                f"Input '{spec.name}' expects {expected} values in [{bounds.min}, "
                f"{bounds.max}], received {array.dtype} values from {low} to {high}; "
                "clip or rescale them first, since casting would wrap them around."
            )
    if expected.kind == "f" and array.dtype != expected and _may_overflow(array.dtype, expected):
        # The cast itself tells, at no cost beyond the error state: numpy flags a finite
        # value that becomes inf as an overflow (NaN and inf already there stay as they are).
        try:
            with np.errstate(over="raise"):
                return np.ascontiguousarray(array, dtype=expected)
        except FloatingPointError:
            _refuse_overflow(spec, array, expected)
    return np.ascontiguousarray(array, dtype=expected)


@functools.lru_cache(maxsize=256)
def _may_overflow(source: np.dtype, target: np.dtype) -> bool:
    """Whether ``source`` holds finite values beyond the largest of ``target`` (a float):
    float64 into float32, int32 into float16; never float32 into float32."""
    if source.kind == "f":
        return bool(np.finfo(source).max > np.finfo(target).max)
    return source.kind in "iu" and int(np.iinfo(source).max) > float(np.finfo(target).max)


def _refuse_overflow(spec: TensorSpec, array: np.ndarray, expected: np.dtype) -> None:
    """Raise ``TypeError`` naming the largest finite magnitude in ``array``."""
    if array.dtype.kind == "f":
        largest = np.max(np.abs(array), initial=0, where=np.isfinite(array))
    else:
        largest = max(abs(int(array.min())), abs(int(array.max())))
    raise TypeError(
        f"Input '{spec.name}' expects {expected} values, at most {_number(np.finfo(expected).max)} "
        f"in magnitude, received {array.dtype} values up to {_number(largest)}; scale them "
        "first, since casting would make them inf."
    )


def _number(value: Any) -> str:
    """``3.4028235e+38``, ``65504``: as few digits as tell the value (of any width)."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    wide = np.longdouble(value)
    if abs(wide) < 1e16 and wide == np.floor(wide):
        return str(int(wide))
    return np.format_float_scientific(value, precision=7, unique=True, trim="-")


def _sorted_keys(keys: Any) -> list:
    """Keys in a stable order for a message, even when a mapping mixes key types."""
    try:
        return sorted(keys)
    except TypeError:  # e.g. str and int keys together
        return sorted(keys, key=repr)
