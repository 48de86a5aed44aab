"""``fuser inspect``: an artifact's manifest, read with the runtime alone (no build code)."""

from __future__ import annotations

import argparse
import json

from fuser.cli.status import EXIT_OK
from runtime import readers
from runtime.describe import describe


def inspect(arguments: argparse.Namespace) -> int:
    path = arguments.artifact
    manifest = readers.read_manifest(
        readers.artifact_format(path), path, verify=not arguments.no_verify
    )
    if arguments.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return EXIT_OK
    print(describe(manifest, str(path), verified=not arguments.no_verify))
    return EXIT_OK
