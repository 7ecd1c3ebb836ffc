"""The docs stay true to the code: every config field and preset is in the configuration reference, and
every CLI command is documented."""

from __future__ import annotations

import re
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


def test_every_relative_link_in_the_docs_points_at_a_file() -> None:
    pages = [*DOCS.glob("*.md"), DOCS.parent / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_python_examples_in_the_docs_are_valid_python() -> None:
    for page in [*DOCS.glob("*.md"), DOCS.parent / "README.md"]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
            compile(block, f"{page.name}[python block {i}]", "exec")


def test_the_architecture_page_lists_every_engine_module() -> None:
    text = (DOCS / "architecture.md").read_text()
    engine = Path(__file__).resolve().parent.parent / "core" / "emllm"
    for module in engine.glob("*.py"):
        if module.name != "__init__.py":
            assert f"`{module.name}`" in text, f"docs/architecture.md does not list {module.name}"
