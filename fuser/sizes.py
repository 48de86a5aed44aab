"""Byte sizes as people write them (``8G``), for options such as ``--max-member-bytes``.

Its own module so that the command line parses sizes without importing the build.
"""

from __future__ import annotations

import re

_SIZE_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_byte_size(text: str) -> int:
    """``"8G"`` -> 8 GiB: a whole number of bytes, optionally with a suffix K, M, G or T
    (powers of 1024, also written KiB, MiB, ...), for ``--max-member-bytes``.

    Raises:
        ValueError: one sentence saying what was expected.
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:([KMGT])(?:i?B)?)?\s*", str(text), re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise ValueError(
            f"Expected a positive number of bytes, optionally with a suffix K, M, G or T "
            f"(powers of 1024), such as 8G; received {text!r}."
        )
    return int(match.group(1)) * _SIZE_SUFFIXES[(match.group(2) or "").upper()]
