"""The docs stay true to the code: every config field and preset is in the configuration reference, and
every CLI command is documented."""

from __future__ import annotations

from pathlib import Path

from emllm import PRESETS, EMLLMConfig
from emllm.cli import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_lists_every_field_with_its_default() -> None:
    text = (DOCS / "configuration.md").read_text()
    fields = text[text.index("## Fields") : text.index("## Presets")]
    rows = {line.split("|")[1].strip(" `"): line for line in fields.splitlines() if line.startswith("| `")}
    for name, field in EMLLMConfig.model_fields.items():
        assert name in rows, f"docs/configuration.md has no row for {name}"
        default = '"' + field.default + '"' if isinstance(field.default, str) else repr(field.default)
        assert f"`{default}`" in rows[name], f"{name}: default {default} not in {rows[name]!r}"
    assert set(rows) <= set(EMLLMConfig.model_fields), "the reference lists a field that does not exist"
    for preset in PRESETS:
        assert f"`{preset}`" in text


def test_every_cli_command_is_documented() -> None:
    text = (DOCS / "sessions.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        assert f"emllm {command}" in text
