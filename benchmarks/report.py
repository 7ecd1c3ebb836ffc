"""What every benchmark script shares: the machine line and writing its own section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
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
        following = text[end + 1 :] if end != -1 else ""
        text = text[:start] + (section.rstrip("\n") + "\n\n" if following else section) + following
    doc.write_text(text)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--results-dir and --threads, as every benchmark script takes them."""
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where results go; anything but the default also receives the docs section and plots "
        "(trial runs leave docs/ alone)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (1 is far faster on a busy machine)")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def outputs(results_dir: Path) -> tuple[Path, Path, Path]:
    """(results folder, docs page, image folder): docs/ for the official results folder, else inside it."""
    out = results_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if out == RESULTS.resolve():
        return out, DOC, ROOT / "docs" / "img"
    return out, out / "benchmarks.md", out / "img"
