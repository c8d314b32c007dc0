"""Write a detector file through its model: what is written is exactly what `monitor check-config` reads."""

from __future__ import annotations

from pathlib import Path

import yaml

from monitor.config.load import parse_detector
from monitor.config.models import DetectorSpec


def write_detector(spec: DetectorSpec, path: Path, header: list[str] = ()) -> None:
    """`header`: comment lines (without '#') kept above the YAML. Only fields the spec sets are written,
    so a hand-written file keeps its shape; the file is read back and must give the same spec."""
    body = yaml.safe_dump(spec.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"# {line}".rstrip() + "\n" for line in header) + body)
    if parse_detector(tmp) != spec:  # a writer bug must never leave a detector that reads differently
        tmp.unlink()
        raise RuntimeError(f"{path}: the written detector does not read back as the same spec")
    tmp.replace(path)
