"""What a subcommand is (`Command`), and the plain-text table every summary prints.

Its own module so that the CLI, the programs and the commands built into the core import it
without importing each other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its config dataclass, and what runs it (returns exit code)."""

    help: str
    config: type[Any] | None
    run: Callable[[Any], int]
    description: str = ""


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table under `title`, columns padded to their widest cell (summaries on stdout)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def render(row: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))

    return "\n".join([title, render(header), line, *(render(r) for r in rows)])


def not_landed(what: str, issue: str) -> Command:
    """A subcommand whose program does not exist yet: it says so and exits 2, never pretends."""

    def run(_: object) -> int:
        print(f"imagewarm: `{what}` is not implemented yet ({issue}); nothing was done.", file=sys.stderr)
        return 2

    return Command(help=f"(not implemented yet: {issue})", config=None, run=run)
