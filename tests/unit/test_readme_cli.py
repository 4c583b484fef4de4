"""Every ``busreg`` command and option the README shows exists (issue 15, section 6): a
documented flag that the CLI does not have is a bug in one of them."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from busreg.ops.cli import _parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _documented() -> list[tuple[str, list[str]]]:
    """(snippet, tokens) of every `busreg ...` command in backticks or code blocks."""
    text = README.read_text()
    snippets = re.findall(r"`(busreg [^`]+)`", text)
    snippets += [
        line.strip() for line in text.splitlines() if line.strip().startswith("busreg ")
    ]
    return [(s, s.replace("\\|", " ").split()) for s in snippets]


def test_every_documented_command_and_option_exists() -> None:
    parser = _parser()
    subs = _subcommands(parser)
    top = _options(parser)
    problems = []
    checked = 0
    for snippet, tokens in _documented():
        command = next((t for t in tokens[1:] if not t.startswith("-") and t in subs), None)
        if command is None:
            word = tokens[1]
            # "busreg [global options] COMMAND", or paths ("ruff busreg tests")
            placeholder = word.startswith(("-", "[", "<")) or word.isupper()
            if placeholder or (README.parent / word).exists():
                continue
            problems.append(f"unknown command in {snippet!r}")
            continue
        known = top | _options(subs[command])
        if command == "bench":
            continue  # its options are the bench's own parser (busreg.bench._parser)
        for token in tokens:
            flag = token.strip("[]()|,.;:").split("=")[0]
            if flag.startswith("--") and len(flag) > 2:
                checked += 1
                if flag not in known:
                    problems.append(f"{command}: {flag} (in {snippet!r})")
    assert problems == []
    assert checked > 20  # the README's CLI reference was read


def test_the_bench_options_in_the_readme_exist() -> None:
    from busreg.bench import _parser as bench_parser

    known = _options(bench_parser())
    flags = {
        t.strip("[]()|,.;:").split("=")[0]
        for snippet, tokens in _documented()
        if len(tokens) > 1 and tokens[1] == "bench"
        for t in tokens
        if t.startswith("--")
    }
    assert flags - known - _options(_parser()) == set()
