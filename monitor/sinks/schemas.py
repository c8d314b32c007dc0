"""The JSON schemas shipped in the package are generated from the event models; this writes or checks one."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Callable


def schema_command(generate: Callable[[], dict], file: str, module: str, argv: list[str] | None = None) -> int:
    """`python -m <module> [--check]`: write monitor/<file> from `generate()`, or fail if it is stale."""
    parser = argparse.ArgumentParser(description=f"Write monitor/{file} from its event model.")
    parser.add_argument("--check", action="store_true", help="fail if the shipped schema is stale; write nothing")
    args = parser.parse_args(argv)
    path = Path(str(resources.files("monitor").joinpath(file)))
    text = json.dumps(generate(), indent=2) + "\n"
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is stale: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(path)
    return 0


def shipped(file: str) -> dict:
    return json.loads(resources.files("monitor").joinpath(file).read_text())
