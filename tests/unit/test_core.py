"""The shared core's small pieces: config from flags and environment, logs, metrics, certificates, CLI."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from imagewarm import certs, cli, logs, metrics
from imagewarm.command import not_landed
from imagewarm.config import (
    ConfigError,
    add_arguments,
    from_arguments,
    parse_bool,
    parse_bytes,
    parse_duration,
    parse_host_port,
    setting,
)


@dataclass(frozen=True)
class ExampleConfig:
    cache_dir: Path = setting(help="where blobs live", parse=Path)
    listen: tuple[str, int] = setting(("127.0.0.1", 7439), help="address", parse=parse_host_port)
    tag_ttl: float = setting(300.0, help="tag recheck", parse=parse_duration)
    upstream: tuple[str, ...] = setting((), help="allowed upstreams", repeated=True)
    verbose: bool = setting(False, help="more logs", parse=parse_bool)

    def __post_init__(self) -> None:
        if self.tag_ttl > 86400:
            raise ValueError("--tag-ttl must be at most 1d")


def _parse(argv: list[str], environ: dict[str, str]) -> ExampleConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ExampleConfig)
    return from_arguments(ExampleConfig, parser.parse_args(argv), environ)


def test_flags_win_over_environment_and_defaults_fill_the_rest() -> None:
    config = _parse(
        ["--cache-dir", "/a", "--upstream", "x.io", "--upstream", "y.io", "--verbose"],
        {"IMAGEWARM_CACHE_DIR": "/b", "IMAGEWARM_TAG_TTL": "5m"},
    )
    assert config == ExampleConfig(
        cache_dir=Path("/a"), tag_ttl=300.0, upstream=("x.io", "y.io"), verbose=True
    )


def test_environment_variables_fill_every_setting() -> None:
    config = _parse(
        [],
        {
            "IMAGEWARM_CACHE_DIR": "/b",
            "IMAGEWARM_LISTEN": "0.0.0.0:80",
            "IMAGEWARM_UPSTREAM": "a.io, b.io",
            "IMAGEWARM_VERBOSE": "no",
            "IMAGEWARM_TAG_TTL": "2h",
        },
    )
    assert config.listen == ("0.0.0.0", 80)
    assert config.upstream == ("a.io", "b.io")
    assert config.tag_ttl == 7200.0
    assert config.verbose is False


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "--cache-dir (or IMAGEWARM_CACHE_DIR) is required"),
        (["--cache-dir", "/a", "--listen", "nope"], {}, "--listen='nope' is not valid: expected HOST:PORT"),
        (["--cache-dir", "/a"], {"IMAGEWARM_TAG_TTL": "soon"}, "IMAGEWARM_TAG_TTL='soon' is not valid"),
        (["--cache-dir", "/a", "--tag-ttl", "2d"], {}, "--tag-ttl must be at most 1d"),
    ],
)
def test_bad_settings_name_the_flag_and_the_reason(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _parse(argv, environ)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1048576", 1 << 20), ("512Mi", 512 << 20), ("20Gi", 20 << 30), ("10G", 10 * 10**9), ("3kb", 3000)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    ("text", "value"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("12", 12)]
)
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["", "5 minutes", "-1s", "1w"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_json_logs_carry_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "json")
    logging.getLogger("imagewarm.test").info("blob cached", extra={"digest": "sha256:ab", "bytes": 3})
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["msg"] == "blob cached"
    assert entry["digest"] == "sha256:ab"
    assert entry["bytes"] == 3
    assert entry["level"] == "info"


def test_metric_names_get_the_prefix_and_need_a_unit() -> None:
    c = metrics.counter("test_core_things_total", "things", ["kind"])
    c.labels(kind="a").inc(2)
    text, content_type = metrics.exposition()
    assert b'imagewarm_test_core_things_total{kind="a"} 2.0' in text
    assert content_type.startswith("text/plain")
    with pytest.raises(ValueError, match="base unit"):
        metrics.gauge("test_core_size", "no unit")
    with pytest.raises(ValueError, match="prefix"):
        metrics.histogram("imagewarm_test_seconds", "double prefix")


def test_issued_certificate_chains_to_its_ca_with_the_sans() -> None:
    ca = certs.new_ca("test-ca")
    leaf = certs.issue(
        ca,
        "webhook.ns.svc",
        dns_names=["webhook.ns.svc"],
        ip_addresses=["10.0.0.1"],
        organizations=["system:nodes"],
        client=True,
    )
    cert = leaf.certificate
    cert.verify_directly_issued_by(ca.certificate)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["webhook.ns.svc"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert "O=system:nodes" in cert.subject.rfc4514_string()
    assert leaf.not_after > ca.certificate.not_valid_before_utc


def test_cli_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("proxy", "webhook", "controller", "demo", "warm", "status"):
        assert f"    {name}" in out


def test_a_subcommand_that_has_not_landed_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    missing = not_landed("imagewarm example", "some issue")
    assert missing.run(None) == 2
    assert "not implemented yet (some issue)" in capsys.readouterr().err


def test_a_subcommand_loads_only_its_own_program() -> None:
    # Programs declare metrics when imported: a proxy that imported the controller served its metrics.
    code = (
        "import sys; from imagewarm import cli; cli._commands(cli._subcommand(['proxy', '--help']));"
        "programs = {'proxy', 'webhook', 'controller', 'localcluster'};"
        "print(sorted({m.split('.')[0] for m in sys.modules} & programs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['proxy']"
