"""Members: what a saved model is, how it is found, checked and loaded.

A member is given as a path (``.keras``, legacy ``.h5``, a SavedModel directory), as
``name=path``, as a ``(name, path)`` pair, or as a ``(name, keras.Model)`` pair for a model
already in memory (which is never modified). ``spec`` holds what a member is, ``detect``
its format, ``limits`` how much it may expand to in memory, ``load`` the loading.
"""

from fuser.members.detect import detect_format
from fuser.members.limits import (
    DEFAULT_MAX_MEMBER_BYTES,
    MAX_ZIP_ENTRIES,
    check_max_member_bytes,
)
from fuser.members.load import load_members
from fuser.members.spec import (
    FORMATS,
    Member,
    MemberSpec,
    branch,
    branch_name,
    check_names,
    parse_specs,
    sha256_of,
)
from fuser.sizes import parse_byte_size

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "FORMATS",
    "MAX_ZIP_ENTRIES",
    "Member",
    "MemberSpec",
    "branch",
    "branch_name",
    "check_max_member_bytes",
    "check_names",
    "detect_format",
    "load_members",
    "parse_byte_size",
    "parse_specs",
    "sha256_of",
]
