"""Write one benchmark's section of ``benchmarks/RESULTS.md``, leaving the others as they are."""

from __future__ import annotations

import os
from pathlib import Path


def write_section(path: str | os.PathLike, heading: str, body: str) -> None:
    """Replace the body under ``heading`` (a ``## ...`` line) in ``path``, or append the section;
    creates the file when missing. The file is replaced atomically."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{heading}\n{body.strip(chr(10))}\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(heading))
        rest = "" if nxt < 0 else "\n" + text[nxt + 1 :]
        text = text[:start] + section + rest
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
