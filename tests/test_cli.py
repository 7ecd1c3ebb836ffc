"""The `emllm` command line, run as a user runs it (a subprocess), on a tiny random model saved to disk with
SmolLM2's tokenizer: persistent chat, ingest, ask, sessions, plot, and errors as exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import tiny_smol_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer):
    path = tmp_path_factory.mktemp("tiny-smol")
    tiny_smol_model(smol_tokenizer).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, smol_tokenizer):
    path = tmp_path_factory.mktemp("tiny-smol-other")
    tiny_smol_model(smol_tokenizer, seed=1).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def emllm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "emllm.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_help_everywhere() -> None:
    for command in ([], ["chat"], ["ingest"], ["ask"], ["sessions"], ["plot"], ["demo"]):
        result = emllm(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: emllm" in result.stdout


def test_chat_remembers_across_runs(model_dir, tmp_path) -> None:
    common = [
        "--model",
        str(model_dir),
        "--store",
        str(tmp_path),
        "--session",
        "pal",
        "--max-new-tokens",
        "4",
    ]
    first = emllm("chat", *common, stdin="Hello there, my name is Ada.\n/quit\n")
    assert first.returncode == 0, first.stderr
    assert "session 'pal': 0 tokens" in first.stdout and "assistant> " in first.stdout
    listing = emllm("sessions", "list", "--store", str(tmp_path))
    tokens = int(listing.stdout.split("\t")[1].split()[0].replace(",", ""))
    assert listing.stdout.startswith("pal\t") and tokens > 10
    second = emllm("chat", *common, stdin="What is my name?\n")  # EOF ends the chat too
    assert second.returncode == 0, second.stderr
    assert f"session 'pal': {tokens:,} tokens" in second.stdout
    grown = emllm("sessions", "info", "pal", "--store", str(tmp_path), "--verify")
    assert int(grown.stdout.split("tokens: ")[1].split()[0]) > tokens
    assert "every file matches its checksum" in grown.stdout


def test_ingest_ask_plot_and_remove(model_dir, tmp_path) -> None:
    doc = tmp_path / "notes.txt"
    doc.write_text("The lighthouse keeper counted ships every evening. " * 250)
    store = ["--store", str(tmp_path / "store")]
    model = ["--model", str(model_dir)]
    ingested = emllm("ingest", str(doc), "--session", "docs", *model, *store)
    assert ingested.returncode == 0, ingested.stderr
    assert "notes.txt:" in ingested.stdout and "events" in ingested.stdout
    asked = emllm(
        "ask", "--session", "docs", "Who counted ships?", "--show-events", "2", "--max-new-tokens", "3",
        *model, *store,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.count("notes.txt") == 2  # two retrieved events, each naming its source
    png = tmp_path / "seg.png"
    plotted = emllm("plot", "--session", "docs", "-o", str(png), *model, *store)
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    removed = emllm("sessions", "rm", "docs", *store)
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert "no sessions" in emllm("sessions", *store).stdout


def test_errors_are_messages_and_exit_codes(model_dir, other_model_dir, tmp_path) -> None:
    store = ["--store", str(tmp_path)]
    missing = emllm("sessions", "rm", "nobody", *store)
    assert missing.returncode == 1 and "no stored session 'nobody'" in missing.stderr
    assert "Traceback" not in missing.stderr
    doc = tmp_path / "a.txt"
    doc.write_text("Some words to remember. " * 20)
    assert emllm("ingest", str(doc), "--session", "s", "--model", str(model_dir), *store).returncode == 0
    wrong = emllm("ingest", str(doc), "--session", "s", "--model", str(other_model_dir), *store)
    assert wrong.returncode == 1 and "was saved with model" in wrong.stderr
    unknown = emllm(
        "plot", "--session", "ghost", "-o", str(tmp_path / "x.png"), "--model", str(model_dir), *store
    )
    assert unknown.returncode == 1 and "ghost" in unknown.stderr
