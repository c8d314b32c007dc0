"""The package's shape: the data path reads one way, nothing imports in a loop, every setting is read.

The layering contracts live in pyproject.toml ([tool.importlinter]); these tests run them, and prove
they can fail by adding an upward import to a copy of the package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import grimp
from pydantic import BaseModel

from monitor.config.models import DetectorSpec, MonitorConfig

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=project, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"})


def test_layering_contracts_are_kept():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_an_upward_import_breaks_the_build(tmp_path):
    """A stage that imports the sidecar (here: scoring) is caught, and the message names the import."""
    shutil.copytree(ROOT / "monitor", tmp_path / "monitor", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "monitor/scoring/space.py").open("a") as f:
        f.write("\nfrom monitor.sidecar import loop  # noqa: E402,F401 - the deliberate mistake\n")
    res = lint(tmp_path)
    assert res.returncode != 0
    assert "stages import only the stages before them" in res.stdout and "BROKEN" in res.stdout
    assert "monitor.scoring.space -> monitor.sidecar.loop" in res.stdout


def test_no_import_loops():
    graph = grimp.build_graph("monitor")
    packages = {m for m in graph.modules if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    modules = sorted(graph.modules - packages)  # a package's face re-exports its own modules: not a loop
    edges = {m: graph.find_modules_directly_imported_by(m) - packages for m in modules}
    index, low, stack, on, loops = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    assert loops == [], f"import loops: {loops}"


def _fields(model: type[BaseModel], seen: set) -> typing.Iterator[tuple[str, str]]:
    """Every setting under `model`. Provenance records (where a threshold came from) are data to read,
    not settings that act; a field with one possible value (`Tap.hook: resid_post`) has nothing to act on."""
    if model in seen or model.__module__ == "monitor.provenance":
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        single = typing.get_origin(field.annotation) is typing.Literal and len(typing.get_args(field.annotation)) == 1
        if not single:
            yield model.__name__, name
        stack = [field.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _fields(t, seen)
            stack.extend(typing.get_args(t))


def test_every_setting_is_read_somewhere():
    """A documented setting nothing reads is a lie to the user: each field of the config and of detector
    files must be read (as an attribute or by name) outside the module that defines it."""
    sources = "\n".join(p.read_text() for p in (ROOT / "monitor").rglob("*.py")
                        if p.name not in ("models.py", "reference.py") and "offline" not in p.parts)
    unread = sorted({f"{owner}.{name}" for owner, name in [*_fields(MonitorConfig, set()), *_fields(DetectorSpec, set())]
                     if not re.search(rf"\.{name}\b|[\"']{name}[\"']", sources)})
    assert unread == [], f"settings read nowhere at run time: {unread}"
