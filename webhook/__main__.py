"""`python -m webhook ...`: the same as `imagewarm webhook ...`, without loading the other programs."""

import argparse
import sys

from imagewarm.config import ConfigError, add_arguments, from_arguments
from webhook.main import command


def main() -> int:
    parser = argparse.ArgumentParser(prog="imagewarm webhook", description=command.help)
    add_arguments(parser, command.config)  # type: ignore[arg-type]
    try:
        config = from_arguments(command.config, parser.parse_args())  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"imagewarm webhook: {exc}", file=sys.stderr)
        return 2
    return command.run(config)


sys.exit(main())
