"""The runbooks the deployment ships, served by the console: the person paged reads the page that
matches this deployment's version, not whatever a repository's main branch says today.

Pages are the Markdown files of `runbooks/` (one per alert, fixed sections). Rendered with
markdown-it-py (CommonMark, raw HTML off: a page can never inject markup into the console).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from markdown_it import MarkdownIt

PAGE_NAME = re.compile(r"^[A-Za-z0-9-]+\.md$")
_SECTION = re.compile(r"^## +(.+?)\s*$", re.MULTILINE)


def runbooks_dir(configured: str | None) -> Path | None:
    """The folder to serve: the configured one (which must exist), else a source checkout's `runbooks/`."""
    if configured:
        d = Path(configured)
        if not (d / "README.md").is_file() and not any(d.glob("*.md")):
            raise ValueError(f"console.runbooks_dir: {d} holds no runbook pages (*.md)")
        return d
    checkout = Path(__file__).resolve().parents[2] / "runbooks"
    return checkout if (checkout / "README.md").is_file() else None


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def render(text: str) -> str:
    """A page's Markdown as HTML; links to sibling pages stay relative, so they resolve under /runbooks/."""
    return _markdown().render(text)


def page(folder: Path, name: str) -> str | None:
    """The page's Markdown, or None for a name that is not a page in the folder (never a path outside it)."""
    if name == "":
        name = "README.md"
    if not PAGE_NAME.match(name):
        return None
    f = folder / name
    return f.read_text(encoding="utf-8") if f.is_file() else None


def section(text: str, title: str) -> str | None:
    """One `## title` section's body (Markdown), or None."""
    heads = list(_SECTION.finditer(text))
    for i, m in enumerate(heads):
        if m.group(1).strip().lower() == title.lower():
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            return text[m.end():end].strip()
    return None
