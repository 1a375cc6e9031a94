"""The Containerfile (the published image) and `./dev.sh image` (localcluster/productimage.py) declare
the same image: entrypoint, command, user, environment, labels, ports, interpreter and site directory.

No container engine runs here, so the Containerfile is parsed (continuations, comments, ARG
substitution) and its final stage compared with the builder's image config.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from localcluster import productimage, pythonruntime

CONTAINERFILE = Path(__file__).resolve().parents[2] / "Containerfile"
INSTRUCTIONS = {
    "FROM",
    "ARG",
    "RUN",
    "COPY",
    "WORKDIR",
    "LABEL",
    "ENV",
    "EXPOSE",
    "USER",
    "ENTRYPOINT",
    "CMD",
}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each with its (INSTRUCTION, arguments) in order."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, arguments = line.strip().partition(" ")
        instruction = instruction.upper()
        assert instruction in INSTRUCTIONS, f"unknown instruction {instruction!r}"
        arguments = arguments.strip()
        if instruction == "FROM":
            parts = arguments.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = arguments.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((instruction, arguments))
    return global_args, stages


def pairs(arguments: str, args: dict[str, str]) -> dict[str, str]:
    """KEY=VALUE pairs of an ENV or LABEL instruction, quotes removed, ``${ARG}`` substituted."""
    result = {}
    for token in shlex.split(arguments):
        key, sep, value = token.partition("=")
        assert sep, f"{token!r} is not KEY=VALUE"
        result[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
    return result


def final_config() -> dict[str, object]:
    """The final stage's image config, as a builder would record it."""
    global_args, stages = parse(CONTAINERFILE.read_text())
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    ports: dict[str, object] = {}
    config: dict[str, object] = {"Env": env, "Labels": labels, "ExposedPorts": ports}
    for instruction, arguments in stages[-1].instructions:
        if instruction == "ARG":
            name, sep, default = arguments.partition("=")
            args[name] = default if sep else global_args[name]
        elif instruction == "ENV":
            env.update(pairs(arguments, args))
        elif instruction == "LABEL":
            labels.update(pairs(arguments, args))
        elif instruction == "EXPOSE":
            ports.update({port: {} for port in arguments.split()})
        elif instruction in ("ENTRYPOINT", "CMD"):
            config[instruction.title()] = json.loads(arguments)  # exec form only
        elif instruction == "USER":
            config["User"] = arguments
        elif instruction == "WORKDIR":
            config["WorkingDir"] = arguments
    return config


def builder_config() -> dict[str, object]:
    config = productimage.image_config(productimage.project()["version"], "unknown")
    return {**config, "Env": dict(entry.split("=", 1) for entry in config["Env"])}


def test_the_containerfile_parses_into_a_build_stage_and_a_distroless_final_stage() -> None:
    global_args, stages = parse(CONTAINERFILE.read_text())
    assert [s.name for s in stages] == ["build", None]
    assert stages[-1].base == "gcr.io/distroless/python3-debian12:nonroot"
    # The final stage pulls nothing but its base: everything else comes from the build stage.
    copies = [a for i, a in stages[-1].instructions if i == "COPY"]
    assert copies and all(a.startswith("--from=build ") for a in copies)
    assert set(global_args) == {"VERSION", "REVISION"}


def test_the_final_stage_declares_the_config_dev_sh_image_builds() -> None:
    assert final_config() == builder_config()


def test_the_version_argument_defaults_to_the_package_version() -> None:
    from imagewarm import __version__

    global_args, _ = parse(CONTAINERFILE.read_text())
    assert global_args["VERSION"] == productimage.project()["version"] == __version__


def test_the_image_runs_as_nonroot_by_default_with_the_imagewarm_entrypoint() -> None:
    config = final_config()
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["imagewarm"]
    # The last USER wins: the compile step runs as root, the image does not.
    _, stages = parse(CONTAINERFILE.read_text())
    users = [a for i, a in stages[-1].instructions if i == "USER"]
    assert users[-1] == "65532:65532"


def test_both_install_into_debians_site_directory_with_debians_interpreter() -> None:
    text = CONTAINERFILE.read_text()
    assert f"site={pythonruntime.SITE_PACKAGES}" in text
    assert f'"{pythonruntime.PYTHON}", "-m", "compileall"' in text
    # The build stage's interpreter is Debian's python3.11, like the final stage's and ./dev.sh image's.
    assert "python3.11 -m pip wheel" in text


def test_the_containerfile_copies_every_packaged_source_path() -> None:
    _, stages = parse(CONTAINERFILE.read_text())
    copied = " ".join(a for i, a in stages[0].instructions if i == "COPY").split()
    for path in productimage.SOURCE_PATHS:
        assert path in copied or f"{path}/" in copied, f"the Containerfile's build stage does not copy {path}"


def test_the_parser_rejects_what_it_does_not_understand() -> None:
    with pytest.raises(AssertionError, match="HEALTHCHECK"):
        parse("FROM x\nHEALTHCHECK CMD true\n")
    with pytest.raises(AssertionError, match="continued"):
        parse("FROM x\nRUN true \\\n")
