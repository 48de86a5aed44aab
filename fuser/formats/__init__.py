"""Artifact formats and writing them: ``output`` checks where one goes, ``write`` writes it.

``registry`` lists the formats (``onnx``, ``savedmodel``, ``keras``: one module each, a
``format.Format`` in each),
``writer`` the one way every artifact is written, ``placement`` how it lands.
"""

from fuser.formats.format import Format
from fuser.formats.registry import FORMATS, format_of, format_problems, output_format
from fuser.formats.writer import Output, output, output_problems, write

__all__ = [
    "FORMATS",
    "Format",
    "Output",
    "format_of",
    "format_problems",
    "output",
    "output_format",
    "output_problems",
    "write",
]
