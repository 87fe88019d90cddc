"""The documentation holds together: relative links resolve, the README stays short and shows the set-up.

The link checker is a function of a file, so the same code runs on the real pages and on a small
page with a broken link that proves it can fail.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 260
SETUP_COMMANDS = ('pip install -e . && cloakonnx demo', 'pip install -e ".[dev]" && pytest')

# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
SKIPPED_SCHEMES = ("http://", "https://", "mailto:")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, CHANGELOG.md and every docs/*.md under ``root``."""
    files = [root / "README.md", root / "CHANGELOG.md", *sorted((root / "docs").glob("*.md"))]
    return [f for f in files if f.exists()]


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line number, target without its #anchor) of every relative link outside fenced code."""
    out, in_fence = [], False
    for lineno, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        for target in LINK.findall(line):
            if target.startswith(SKIPPED_SCHEMES) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if path:
                out.append((lineno, path))
    return out


def broken_links(path: Path) -> list[str]:
    """'file:line: target' for every relative link in ``path`` that names no existing file or folder."""
    path = Path(path)
    bad = []
    for lineno, target in relative_links(path.read_text(encoding="utf-8")):
        if not (path.parent / target).exists():
            bad.append(f"{path.name}:{lineno}: {target}")
    return bad


def test_the_pages_are_found():
    names = {f.relative_to(ROOT).as_posix() for f in doc_files()}
    assert {"README.md", "CHANGELOG.md", "docs/cli.md", "docs/results.md", "docs/executor.md",
            "docs/performance.md", "docs/cluster.md", "docs/architecture.md"} <= names


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# there\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "See [this](docs/there.md#there), [a site](https://example.com/x.md), [mail](mailto:a@b.c),\n"
        "[an anchor](#top) and ![a plot](docs/missing.png).\n"
        "Also [gone](docs/gone.md#part) and [a titled one](docs/absent.md \"title\").\n"
        "```\n[in a fence](docs/fenced.md)\n```\n"
        "`[in code](docs/code.md)`\n",
        encoding="utf-8")
    assert broken_links(page) == ["README.md:2: docs/missing.png", "README.md:3: docs/gone.md",
                                  "README.md:3: docs/absent.md"]
    assert [p.name for p in doc_files(tmp_path)] == ["README.md", "there.md"]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_readme_shows_both_set_up_commands():
    text = README.read_text(encoding="utf-8")
    for command in SETUP_COMMANDS:
        assert command in text
    assert "cloakonnx demo" in text and "pytest" in text


def undocumented_options(page: Path) -> list[str]:
    """'COMMAND --option' for every long option of every command that ``page`` never mentions."""
    import click

    from cloakonnx.cli import main

    text = Path(page).read_text(encoding="utf-8")
    missing = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            for flag in param.opts + param.secondary_opts:
                if flag.startswith("--") and flag != "--help" and not re.search(rf"(?<![\w-]){flag}(?![\w-])", text):
                    missing.append(f"{name} {flag}")
    return missing


def test_cli_reference_names_every_option():
    """docs/cli.md is generated from --help; an option added or renamed since must be added there too."""
    assert undocumented_options(ROOT / "docs" / "cli.md") == []


def test_option_check_can_fail(tmp_path):
    page = tmp_path / "cli.md"
    page.write_text("| `--data PATH` | ... |\n| `--data-workers N` | ... |\n", encoding="utf-8")
    missing = undocumented_options(page)
    assert "harden --eps" in missing and "harden --data-loader-script" in missing
    assert not any(m.endswith((" --data", " --data-workers")) for m in missing)
