"""Custom Keras classes a saved model needs, read from the file itself.

A class registered with ``keras.saving.register_keras_serializable(package="rw")`` is
saved under its registered name, ``rw>Scale``: a ``.keras`` file's ``config.json``
records it with the module that defined it (``"module": "rw"``), a legacy ``.h5`` file's
``model_config`` attribute records the name alone. Keras finds such a class only if that
module was imported first (its decorator registers it) or if the caller passes it in
``custom_objects``; otherwise it fails with a message that names the class without its
package (``.keras``) or that names nothing useful at all. Reading the names from the
file lets both the build (members) and the runtime (``.keras`` artifacts) say which
class is missing and what to do.

Imports Keras only to look at its registry, after a load failed; never TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

# Packages whose classes Keras imports by itself when it meets their module in a config.
KERAS_OWN = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp"})


def registered_classes(path: str | os.PathLike) -> dict[str, str | None]:
    """``{"package>Class": module}`` for every registered class the model's config names,
    the module being None where the file does not record it (``.h5``); empty when the
    config cannot be read (or ``path`` is a SavedModel directory)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
        else:
            import h5py

            with h5py.File(path, "r") as file:
                text = file.attrs.get("model_config")
            config = json.loads(text) if text is not None else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return {}
    found: dict[str, str | None] = {}
    pending = [config]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            module = node.get("module")
            for key in ("registered_name", "class_name"):  # .keras, .h5
                name = node.get(key)
                if isinstance(name, str) and ">" in name:
                    found.setdefault(name, module if isinstance(module, str) else None)
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def keyed_by_registered_name(
    path: str | os.PathLike, custom_objects: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """``custom_objects`` also under the registered names the file records for them.

    Keras looks a registered class up by the name it was saved under (``rw>Scale``) only,
    while users give it by its class name (``--custom-objects rw:Scale``); a class
    registered under another package where it is loaded would not be found either.
    """
    if not custom_objects:
        return dict(custom_objects) if custom_objects is not None else None
    keyed = dict(custom_objects)
    for registered in registered_classes(path):
        package, _, name = registered.rpartition(">")
        if package and name in custom_objects:
            keyed.setdefault(registered, custom_objects[name])
    return keyed


def missing_classes(
    path: str | os.PathLike, custom_objects: Mapping[str, Any] | None = None
) -> dict[str, str | None]:
    """The registered classes the model at ``path`` names that neither Keras' registry
    (the modules imported so far) nor ``custom_objects`` provides: ``{name: module}``."""
    import keras

    registry = keras.saving.get_custom_objects()
    given = keyed_by_registered_name(path, custom_objects) or {}
    return {
        name: module
        for name, module in registered_classes(path).items()
        if name not in registry
        and name not in given
        and (module or "").split(".")[0] not in KERAS_OWN
    }


def describe_missing(missing: Mapping[str, str | None]) -> str:
    """``it uses the custom Keras class 'rw>Scale' (module 'rw'), not registered in this
    process; import ...``: the classes, where they are defined, and both remedies."""
    names = ", ".join(
        f"{name!r}" + (f" (module {module!r})" if module else "")
        for name, module in missing.items()
    )
    options = " ".join(
        f"--custom-objects {module or 'MODULE'}:{name.rpartition('>')[2]}"
        for name, module in missing.items()
    )
    if len(missing) == 1:
        return (
            f"it uses the custom Keras class {names}, not registered in this process; import "
            f"the module that defines it, or pass {options} (custom_objects=) for classes you "
            "trust."
        )
    return (
        f"it uses the custom Keras classes {names}, not registered in this process; import "
        f"the modules that define them, or pass {options} (custom_objects=) for classes you "
        "trust."
    )


def explain_load_error(
    path: str | os.PathLike, error: BaseException, custom_objects: Mapping[str, Any] | None = None
) -> str | None:
    """Why Keras could not load ``path``, when the cause is a custom class it could not
    find (``describe_missing``); None for any other cause.

    The file's config is the source of truth. Keras' message is read only when the file
    names no missing class (an unreadable config, or a class never registered, saved
    under its bare class name): ``Unknown layer: 'rw>Scale'`` (``.h5``), or ``Could not
    locate class 'Scale'`` followed by the object's config (``.keras``).
    """
    missing = missing_classes(path, custom_objects)
    if missing:
        return describe_missing(missing)
    text = " ".join(str(error).split())
    unknown = re.search(r"Unknown (?:layer|object|[a-z_ ]{1,40}?)\s*:?\s*'([^']+)'", text)
    if unknown:
        return describe_missing({unknown.group(1): None})
    located = re.search(r"Could not locate (?:class|function) '([^']+)'(.*)", text)
    if not located:
        return None
    name, rest = located.groups()
    module = re.search(r"Full object config: \{'module': '([\w.]+)'", rest)
    registered = re.search(r"'registered_name': '([^']+)'", rest)
    return describe_missing(
        {registered.group(1) if registered else name: module.group(1) if module else None}
    )
