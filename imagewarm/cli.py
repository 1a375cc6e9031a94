"""The `imagewarm` console script: one subcommand per program, found by name.

The core does not import the programs (layering): each registers a `Command` under the
`imagewarm.commands` entry-point group, and the CLI loads it when asked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from imagewarm import __version__
from imagewarm.command import Command, not_landed
from imagewarm.config import ConfigError, add_arguments, from_arguments

# Subcommands registered by other packages: the three programs and the local-cluster demo.
REGISTERED = ("proxy", "webhook", "controller", "demo")


def _builtin_commands() -> dict[str, Command]:
    # Imported here so `imagewarm --help` stays fast.
    from imagewarm import statuscommand, warmcommand

    return {"warm": warmcommand.command, "status": statuscommand.command}


def _commands(only: str | None = None) -> dict[str, Command]:
    """The subcommands by name; with `only` (a subcommand's name), just that one. Loading a program's
    command imports its modules, and some declare metrics when imported: a process must load only
    the program it runs, or another program's metrics land in its /metrics (and its files)."""
    builtins = _builtin_commands()
    if only in builtins:
        return {only: builtins[only]}
    commands = {ep.name: ep for ep in entry_points(group="imagewarm.commands")}
    loaded: dict[str, Command] = {}
    for name in REGISTERED if only not in REGISTERED else (only,):
        ep = commands.get(name)
        loaded[name] = ep.load() if ep else not_landed(f"imagewarm {name}", "not installed")
    if only not in REGISTERED:
        loaded.update(builtins)
    return loaded


def _subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names (its first argument not starting with -), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagewarm",
        description="Container images pulled once per cluster, served from the node, warmed ahead of need.",
        epilog="Every flag also reads an IMAGEWARM_<FLAG> environment variable (e.g. IMAGEWARM_CACHE_DIR).",
    )
    parser.add_argument("--version", action="version", version=f"imagewarm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in commands.items():
        p = sub.add_parser(name, help=command.help, description=command.description or command.help)
        if command.config is not None:
            add_arguments(p, command.config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands(_subcommand(argv))
    args = build_parser(commands).parse_args(argv)
    command = commands[args.command]
    try:
        config = from_arguments(command.config, args) if command.config is not None else None
    except ConfigError as exc:
        print(f"imagewarm {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return command.run(config)
    except KeyboardInterrupt:
        return 130
