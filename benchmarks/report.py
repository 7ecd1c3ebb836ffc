"""What every benchmark script shares: the machine line and writing its own section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DOC_HEADER = "# Benchmarks\n\nEvery table is written by the script named in it.\n\n"


def machine(threads: int | None = None) -> str:
    """e.g. 'x86_64, 2 CPU cores, torch threads: 1, torch CPU, fp32'."""
    cores = len(os.sched_getaffinity(0))
    return f"{platform.machine()}, {cores} CPU cores, torch threads: {threads or cores}, torch CPU, fp32"


def replace_section(doc: Path, heading: str, section: str) -> None:
    """Put `section` in place of the `heading` section of doc (appended if absent); others untouched."""
    text = doc.read_text() if doc.exists() else DOC_HEADER
    start = text.find(heading + "\n")
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    doc.write_text(text)
