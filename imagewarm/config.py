"""Config: one frozen dataclass per program, filled from flags, then `IMAGEWARM_*`, then defaults.

A program declares its settings as dataclass fields made with `setting()`; `add_arguments` turns
them into flags, `from_arguments` builds the frozen value and validates it. A bad value raises
`ConfigError` naming the flag, its environment variable and what is wrong with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from imagewarm.errors import ImagewarmError

T = TypeVar("T")

_MISSING_VALUE = object()


class ConfigError(ImagewarmError, ValueError):
    """A setting has a bad value; the message names the flag, the variable and the problem."""


def setting(
    default: Any = _MISSING_VALUE,
    *,
    help: str,
    parse: Callable[[str], Any] = str,
    repeated: bool = False,
    metavar: str | None = None,
    positional: bool = False,
) -> Any:
    """Declare one setting. `parse` turns the text of a flag or variable into the value (raising
    ValueError with a reason when it cannot); `repeated` settings are tuples, given by repeating
    the flag or as a comma-separated variable. A `positional` repeated setting is given as the
    command's arguments instead of a flag. Without a default the setting is required."""
    if positional and not repeated:
        raise TypeError("a positional setting takes any number of arguments: declare it repeated=True")
    meta = {"help": help, "parse": parse, "repeated": repeated, "metavar": metavar, "positional": positional}
    if repeated:
        return dataclasses.field(
            default=tuple(default) if default is not _MISSING_VALUE else (), metadata=meta
        )
    if default is _MISSING_VALUE:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field[Any]) -> str:
    return "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field[Any]) -> str:
    return "IMAGEWARM_" + field.name.upper()


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def add_arguments(parser: argparse.ArgumentParser, config_class: type[Any]) -> None:
    """Add one flag per setting of `config_class` to `parser` (values parsed later, with env)."""
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if not meta:
            continue
        default = "required" if _required(field) else f"default: {_show(field.default)}"
        text = f"{meta['help']} ({default}; env {env_name(field)})"
        if meta.get("positional"):
            parser.add_argument(field.name, nargs="*", default=None, metavar=meta["metavar"], help=text)
        elif meta["parse"] is parse_bool:
            parser.add_argument(
                flag_name(field),
                dest=field.name,
                nargs="?",
                const="true",
                default=None,
                metavar="BOOL",
                help=text,
            )
        elif meta["repeated"]:
            parser.add_argument(
                flag_name(field),
                dest=field.name,
                action="append",
                default=None,
                metavar=meta["metavar"],
                help=text + "; repeatable",
            )
        else:
            parser.add_argument(
                flag_name(field), dest=field.name, default=None, metavar=meta["metavar"], help=text
            )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value) or "none"


def from_arguments(
    config_class: type[T], args: argparse.Namespace | None = None, environ: dict[str, str] | None = None
) -> T:
    """Build `config_class` from parsed flags, falling back to `IMAGEWARM_*` variables, then defaults.

    Raises ConfigError naming the setting when a value does not parse, a required one is missing,
    or the dataclass's own `__post_init__` validation rejects it."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):  # type: ignore[arg-type]
        meta = field.metadata
        if not meta:
            continue
        given = getattr(args, field.name, None) if args is not None else None
        if meta.get("positional") and not given:
            given = None  # no arguments: the variable or default applies
        source = (meta["metavar"] or field.name.upper()) if meta.get("positional") else flag_name(field)
        if given is None and env_name(field) in environ:
            raw_env = environ[env_name(field)]
            given = [p.strip() for p in raw_env.split(",") if p.strip()] if meta["repeated"] else raw_env
            source = env_name(field)
        if given is None:
            if _required(field):
                raise ConfigError(f"{flag_name(field)} (or {env_name(field)}) is required: {meta['help']}")
            continue
        try:
            values[field.name] = (
                tuple(meta["parse"](g) for g in given) if meta["repeated"] else meta["parse"](given)
            )
        except ValueError as exc:
            raise ConfigError(f"{source}={given!r} is not valid: {exc}") from None
    try:
        return config_class(**values)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# Parsers for common setting types. Each raises ValueError with a reason.

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'500ms', '30s', '5m', '2h', '1d' or plain seconds -> seconds (float)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError("expected a duration such as 30s, 5m, 2h or 1d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


_BYTES = re.compile(r"^(\d+)\s*(|k|m|g|t|ki|mi|gi|ti|kb|mb|gb|tb)?b?$", re.I)
_BYTE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}


def parse_bytes(text: str) -> int:
    """'1048576', '512Mi', '20Gi', '10G' -> bytes (int)."""
    m = _BYTES.match(text.strip())
    if not m:
        raise ValueError("expected a size such as 1073741824, 512Mi or 20Gi")
    return int(m.group(1)) * _BYTE_UNITS[(m.group(2) or "").lower()]


def parse_host_port(text: str) -> tuple[str, int]:
    """'127.0.0.1:7439', '[::1]:7439', 'localhost:80' -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:7439")
    return host.strip("[]"), int(port)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value
