"""The ``fuser`` command: a thin argparse layer over ``fuser.build`` and ``runtime.load``.

``parser`` declares the commands and their options and names, for each, the function that
runs it (``module:function``: ``commands`` for most, ``inspect`` for ``fuser inspect``); the
module is imported when its command runs, as pip does with its commands, so ``fuser
inspect`` and ``--help`` load no build code. Here, the one way every command ends: exit status 0 ok, 1 the work failed, 2 bad usage or bad
input, with one sentence on stderr (the traceback with ``--debug``). TensorFlow, Keras
and onnxruntime are imported only by the work that needs them (a build, a SavedModel
artifact, an ONNX session), so ``fuser --help`` and ``fuser inspect`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from fuser.cli.parser import parser as command_parser
from fuser.cli.status import EXIT_BAD_INPUT, EXIT_FAILED
from fuser.errors import FuseError, FuseWarning, StageError, VerificationError
from runtime.errors import ArtifactError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser()
    arguments, extra = parser.parse_known_args(argv)
    if arguments.command == "build" and not any(item.startswith("-") for item in extra):
        arguments.members += extra  # members given after options: a.keras -o x.onnx b.keras
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if arguments.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    warnings.showwarning = _show_warning
    try:
        return _handler(arguments.handler)(arguments)
    except KeyboardInterrupt:
        print("fuser: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as error:  # one sentence for the user; the traceback with --debug
        if arguments.debug:
            traceback.print_exc()
        status = EXIT_BAD_INPUT if _is_bad_input(error) else EXIT_FAILED
        print(f"fuser: error: {_message(error)}", file=sys.stderr)
        if status == EXIT_FAILED and not arguments.debug:
            print("fuser: run again with --debug for the traceback.", file=sys.stderr)
        return status


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    """The function ``module:function`` names (the parser's ``handler``)."""
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """fuser's warnings as one line on stderr; others as Python shows them."""
    if issubclass(category, FuseWarning):
        print(f"fuser: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr)


def _is_bad_input(error: BaseException) -> bool:
    if isinstance(error, (VerificationError, StageError)):
        return False
    return isinstance(error, (FuseError, ArtifactError, ValueError, TypeError, FileNotFoundError))


def _message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    return lines[0] if len(lines) == 1 else "\n".join(["", *(f"  {line}" for line in lines)])
