"""Pure parts of warming: proxy paths, platform choice from an index, error messages, the CLI's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagewarm import cli, platforms, warmcommand, warmup
from imagewarm.config import ConfigError, from_arguments
from imagewarm.platforms import ALL, Platform
from imagewarm.reference import parse
from proxy import routes

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "image, path",
    [
        ("registry.corp:5000/team/app:1.4", "/v2/registry.corp_5000/team/app/manifests/1.4"),
        ("redis:7", "/v2/docker.io/library/redis/manifests/7"),
        ("Registry.Corp/app", "/v2/registry.corp/app/manifests/latest"),
        (f"ghcr.io/o/app:1@{DIGEST}", f"/v2/ghcr.io/o/app/manifests/{DIGEST}"),
    ],
)
def test_manifest_path_is_the_proxys_rewrite_mode_path(image: str, path: str) -> None:
    ref = parse(image)
    built = warmup.proxied_path(ref, "manifests", warmup.manifest_identifier(ref))
    assert built == path
    # The proxy reads it back as the same registry, repository and reference.
    target = routes.parse(built)
    assert (target.registry, target.repository) == (ref.registry, ref.repository)
    assert target.reference == (ref.digest or ref.tag or "latest")


def test_blob_path() -> None:
    path = warmup.proxied_path(parse("127.0.0.1:5000/demo/app:1"), "blobs", DIGEST)
    assert path == f"/v2/127.0.0.1_5000/demo/app/blobs/{DIGEST}"
    assert routes.parse(path).kind is routes.Kind.BLOB


def entry(platform: str | None, n: int) -> dict[str, object]:
    found: dict[str, object] = {"digest": f"sha256:{n:064x}", "size": 10}
    if platform:
        parts = platform.split("/")
        found["platform"] = dict(zip(("os", "architecture", "variant"), parts, strict=False))
    return found


INDEX = [
    entry("linux/amd64", 1),
    entry("linux/arm64/v8", 2),
    entry("linux/arm/v6", 3),
    entry("linux/arm/v7", 4),
    entry(None, 5),  # e.g. an attestation without a declared platform
]


@pytest.mark.parametrize(
    "wanted, chosen",
    [
        ("linux/amd64", 1),
        ("linux/arm64", 2),  # arm64 is arm64/v8
        ("linux/arm64/v8", 2),
        ("linux/arm", 3),  # no variant asked: the first arm entry
        ("linux/arm/v7", 4),
        ("LINUX/AMD64", 1),
    ],
)
def test_platform_choice_from_an_index(wanted: str, chosen: int) -> None:
    assert platforms.choose(INDEX, platforms.parse_platform(wanted)) == [INDEX[chosen - 1]]


def test_an_exact_variant_is_preferred_over_a_compatible_one() -> None:
    entries = [entry("linux/amd64/v3", 1), entry("linux/amd64", 2)]
    assert platforms.choose(entries, Platform("linux", "amd64")) == [entries[1]]
    assert platforms.choose(entries[:1], Platform("linux", "amd64")) == [entries[0]]


def test_all_platforms_takes_every_entry() -> None:
    assert platforms.choose(INDEX, platforms.parse_choice("all")) == INDEX
    assert platforms.parse_choice(" All ") == ALL


def test_a_missing_platform_names_the_ones_there_are_and_what_to_do() -> None:
    with pytest.raises(platforms.NoMatchingPlatform) as caught:
        platforms.choose(INDEX, Platform("linux", "s390x"), "app:1")
    message = str(caught.value)
    assert "app:1 has no linux/s390x image" in message
    assert "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8" in message
    assert "--platform" in message


@pytest.mark.parametrize("text", ["linux", "linux/amd64/v2/x", "linux//amd64", "linux/am d64", ""])
def test_bad_platforms_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="os/arch"):
        platforms.parse_choice(text)


@pytest.mark.parametrize(
    "machine, platform", [("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("AMD64", "linux/amd64")]
)
def test_this_platform_uses_go_architecture_names(
    monkeypatch: pytest.MonkeyPatch, machine: str, platform: str
) -> None:
    monkeypatch.setattr(platforms.host, "machine", lambda: machine)
    assert str(platforms.this_platform()) == platform


IMAGE = parse("registry.corp:5000/team/app:1.4")


def oci(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


def test_401_without_credentials_asks_for_a_docker_config_entry() -> None:
    error = warmup.error_for(
        IMAGE, 401, oci("UNAUTHORIZED", "it is private"), credentials_sent=False, what="manifest 1.4"
    )
    assert isinstance(error, warmup.CredentialsRefused) and isinstance(error, PermissionError)
    assert str(error).startswith(
        "credentials refused for registry.corp:5000/team/app:1.4: "
        "give --docker-config with an entry for registry.corp:5000"
    )
    assert "no credentials were sent" in str(error)
    assert "UNAUTHORIZED: it is private" in str(error)


def test_403_for_credentials_sent_is_a_refusal() -> None:
    error = warmup.error_for(IMAGE, 403, oci("DENIED", "not these"), credentials_sent=True, what="blob x")
    assert isinstance(error, warmup.CredentialsRefused)
    assert "the credentials sent were refused" in str(error) and "DENIED: not these" in str(error)


def test_403_without_credentials_shows_the_proxys_reason_not_a_credentials_hint() -> None:
    body = oci("DENIED", "registry registry.corp:5000 is not an upstream of this proxy")
    error = warmup.error_for(IMAGE, 403, body, credentials_sent=False, what="manifest 1.4")
    assert not isinstance(error, warmup.CredentialsRefused)
    assert "not an upstream of this proxy" in str(error)


def test_404_manifest_is_manifest_unknown() -> None:
    error = warmup.error_for(
        IMAGE, 404, oci("MANIFEST_UNKNOWN", "no such tag"), credentials_sent=False, what="manifest 1.4"
    )
    assert isinstance(error, warmup.ManifestUnknown) and isinstance(error, LookupError)
    assert str(error).startswith("manifest unknown: registry.corp:5000/team/app:1.4")
    assert "MANIFEST_UNKNOWN: no such tag" in str(error)


def test_other_errors_show_the_status_the_oci_error_and_a_hint() -> None:
    error = warmup.error_for(
        IMAGE, 502, oci("UPSTREAM_UNAVAILABLE", "connection refused"), credentials_sent=False, what="blob x"
    )
    assert type(error) is warmup.WarmError
    assert "502" in str(error) and "UPSTREAM_UNAVAILABLE: connection refused" in str(error)
    assert "retry" in str(error)


def test_error_bodies_that_are_not_oci_json_are_shown_briefly() -> None:
    assert warmup.oci_error_text(b"<html>Bad Gateway</html>\nmore") == "<html>Bad Gateway</html>"
    assert warmup.oci_error_text(b"") == "no details"
    two = {"errors": [{"code": "A", "message": "one"}, {"code": "B", "message": "two"}]}
    assert warmup.oci_error_text(json.dumps(two).encode()) == "A: one; B: two"


def test_progress_line() -> None:
    progress = warmup.Progress(parse("nginx:1.27"), 3 << 20, 64 << 20, 2, 4, DIGEST)
    assert warmup.describe(progress) == "warm nginx:1.27:     3.0 / 64.0 MiB, 2/4 blobs  sha256:abababababab"
    assert warmup.describe(warmup.Progress(parse("nginx"), 0, 0, 0, 1)).endswith("0/1 blobs")


def test_docker_config_lookup_follows_docker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    assert warmcommand.docker_config_path("", {}, home) is None  # no file: anonymous
    (home / ".docker" / "config.json").write_text("{}")
    assert warmcommand.docker_config_path("", {}, home) == home / ".docker" / "config.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert warmcommand.docker_config_path("", {"DOCKER_CONFIG": str(elsewhere)}, home) is None
    (elsewhere / "config.json").write_text("{}")
    assert warmcommand.docker_config_path("", {"DOCKER_CONFIG": str(elsewhere)}, home) == (
        elsewhere / "config.json"
    )
    given = tmp_path / "given.json"
    assert warmcommand.docker_config_path(str(given), {"DOCKER_CONFIG": str(elsewhere)}, home) == given
    assert warmcommand.docker_config_path(str(elsewhere), {}, home) == elsewhere / "config.json"


def test_credentials_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {"registry.corp:5000": {"username": "u", "password": "p"}}}))
    loaded = warmcommand.load_credentials(path)
    assert list(loaded.entries) == ["registry.corp:5000"] and not loaded.helpers
    path.write_text(json.dumps({"credsStore": "desktop"}))
    assert warmcommand.load_credentials(path).helpers
    assert warmcommand.load_credentials(None).entries == {}


@pytest.mark.parametrize(
    "content, message", [(None, "cannot read the docker config"), ("{not json", "is not JSON")]
)
def test_unreadable_config_files_are_named(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(warmcommand.CredentialsFileError, match=message) as caught:
        warmcommand.load_credentials(path)
    assert str(path) in str(caught.value)


def test_warm_config_from_arguments_and_environment() -> None:
    parser = cli.build_parser({"warm": warmcommand.command})
    args = parser.parse_args(["warm", "redis:7", "registry.corp:5000/app:1", "--platform", "all"])
    config = from_arguments(warmcommand.WarmConfig, args, environ={"IMAGEWARM_PROXY": "http://node:7439/"})
    assert config.images == (parse("redis:7"), parse("registry.corp:5000/app:1"))
    assert config.platform == ALL and config.proxy == "http://node:7439"
    assert config.docker_config == ""
    from_env = from_arguments(
        warmcommand.WarmConfig, parser.parse_args(["warm"]), environ={"IMAGEWARM_IMAGES": "a:1,b:2"}
    )
    assert [i.familiar for i in from_env.images] == ["a:1", "b:2"]
    assert from_env.platform == platforms.this_platform()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["warm"], "give at least one IMAGE"),
        (["warm", "Foo/bar"], "must be lower-case"),
        (["warm", "redis", "--proxy", "localhost:7439"], "base URL"),
        (["warm", "redis", "--platform", "amd64"], "os/arch"),
    ],
)
def test_bad_arguments_exit_2_saying_why(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=message):
        from_arguments(
            warmcommand.WarmConfig, cli.build_parser({"warm": warmcommand.command}).parse_args(argv), {}
        )


@pytest.mark.parametrize("text", ["", "/cred", "shop/", "shop/cred/extra"])
def test_pull_secret_names_are_namespace_slash_name_or_name(text: str) -> None:
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        warmcommand.parse_secret_name(text)
    assert warmcommand.parse_secret_name(" shop/registry-cred ") == ("shop", "registry-cred")
    assert warmcommand.parse_secret_name("registry-cred") == ("", "registry-cred")


def test_direct_mode_needs_the_pull_secrets_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["warm", "redis", "--proxy", "http://127.0.0.1:1", "--pull-secret", "registry-cred"]
    assert cli.main(argv) == 2
    assert "direct mode reads the secret here and needs NAMESPACE/NAME" in capsys.readouterr().err
