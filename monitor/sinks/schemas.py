"""The CloudEvents envelope both event types share, and their JSON schemas, generated from the models.

The schemas shipped in the package (`monitor/schemas/*.json`) are written (or checked) by
`schema_command`, so a model and its schema never disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

DATE_TIME = {"format": "date-time"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CloudEvent(Strict):
    """CloudEvents 1.0 in structured JSON mode; a subclass adds `type`, `dataschema` and `data`."""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, description="Unique per event; consumers dedupe on it (delivery is at least once).")
    source: str = Field(min_length=1, description="/misalignment-monitor/<deployment>/<pod>")
    time: str = Field(json_schema_extra=DATE_TIME)
    datacontenttype: Literal["application/json"] = "application/json"
    subject: str = Field(description="The request id the caller sees (X-Request-Id).")


def generated_schema(model: type[CloudEvent], ref: str) -> dict:
    schema = model.model_json_schema()
    # Every envelope field is always written: a consumer may rely on each being present.
    schema["required"] = list(model.model_fields)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": ref, **schema}


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
