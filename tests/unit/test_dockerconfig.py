"""Docker config / pull secret parsing and the Authorization header a warm-up client sends."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagewarm import dockerconfig
from imagewarm.dockerconfig import DockerConfigError, RegistryCredentials


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + b64(f"{user}:{password}")


CONFIG = {
    "auths": {
        "https://index.docker.io/v1/": {"auth": b64("hub:hubpass")},
        "registry.corp:5000": {"username": "corp", "password": "c:o:l:o:n"},
        "https://ghcr.io": {"auth": b64("gh:ghpass"), "email": "x@example.com"},
        "registry.corp:5000/team": {"auth": b64("team:teampass")},
        "*.mirror.example": {"auth": b64("glob:globpass")},
        "tokens.example": {"identitytoken": "refresh-me"},
    },
    "credsStore": "desktop",
}


@pytest.mark.parametrize(
    ("key", "normalised"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("HTTPS://Registry.Corp:5000/v2/", "registry.corp:5000"),
        ("http://localhost:5000", "localhost:5000"),
        ("registry.corp_5000", "registry.corp:5000"),
        ("ghcr.io/org/", "ghcr.io/org"),
        ("*.corp.example", "*.corp.example"),
    ],
)
def test_keys_are_normalised(key, normalised):
    assert dockerconfig.normalise_key(key) == normalised


@pytest.mark.parametrize("key", ["", "https://", "bad host", "-x.example"])
def test_keys_that_name_no_registry_are_refused(key):
    with pytest.raises(DockerConfigError):
        dockerconfig.normalise_key(key)


def test_config_json_entries_and_lookups():
    creds = dockerconfig.parse_config(json.dumps(CONFIG))
    assert set(creds) == {
        "docker.io",
        "registry.corp:5000",
        "ghcr.io",
        "registry.corp:5000/team",
        "*.mirror.example",
    }
    assert dockerconfig.authorization_for(creds, "nginx") == basic("hub", "hubpass")
    assert dockerconfig.authorization_for(creds, "docker.io/library/nginx:1.27") == basic("hub", "hubpass")
    assert dockerconfig.authorization_for(creds, "index.docker.io/me/app") == basic("hub", "hubpass")
    # A password may contain colons: only the first one separates it from the user.
    assert dockerconfig.authorization_for(creds, "registry.corp:5000/app:1") == basic("corp", "c:o:l:o:n")
    # A path key is more specific than its host, on path component boundaries only.
    assert dockerconfig.authorization_for(creds, "registry.corp:5000/team/app") == basic("team", "teampass")
    assert dockerconfig.authorization_for(creds, "registry.corp:5000/teamwork/app") == basic(
        "corp", "c:o:l:o:n"
    )
    assert dockerconfig.authorization_for(creds, "eu.mirror.example/app") == basic("glob", "globpass")
    assert dockerconfig.authorization_for(creds, "a.eu.mirror.example/app") is None  # one label per *
    assert dockerconfig.authorization_for(creds, "registry.corp/app") is None  # another port
    assert dockerconfig.authorization_for(creds, "tokens.example/app") is None  # token-only: skipped
    assert dockerconfig.authorization_for(creds, "quay.io/app") is None


def test_exact_hosts_win_over_globs():
    creds = dockerconfig.parse_config(
        {"auths": {"*.example": {"auth": b64("glob:g")}, "a.example": {"auth": b64("exact:e")}}}
    )
    assert dockerconfig.authorization_for(creds, "a.example/x") == basic("exact", "e")
    assert dockerconfig.authorization_for(creds, "b.example/x") == basic("glob", "g")


def test_legacy_dockercfg_has_no_auths_wrapper():
    creds = dockerconfig.parse_config({"https://index.docker.io/v1/": {"auth": b64("u:p"), "email": "e"}})
    assert creds == {"docker.io": RegistryCredentials("docker.io", "u", "p")}


def test_config_without_stored_credentials_is_empty():
    assert dockerconfig.parse_config({"credsStore": "osxkeychain"}) == {}
    assert dockerconfig.parse_config({"auths": {}}) == {}


def test_first_spelling_of_a_registry_wins():
    auths = {"docker.io": {"auth": b64("first:1")}, "https://index.docker.io/v1/": {"auth": b64("second:2")}}
    creds = dockerconfig.parse_config(json.dumps({"auths": auths}))
    assert creds["docker.io"].username == "first"


def secret(kind: str, name: str, payload: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "pull", "namespace": "default"},
        "type": kind,
        "data": {name: b64(json.dumps(payload))},
    }


def test_pull_secrets_of_both_types_and_merge_order():
    modern = dockerconfig.from_secret(
        secret(
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            {"auths": {"ghcr.io": {"auth": b64("a:1")}}},
        )
    )
    legacy = dockerconfig.from_secret(
        secret(
            "kubernetes.io/dockercfg",
            ".dockercfg",
            {"ghcr.io": {"auth": b64("b:2")}, "quay.io": {"auth": b64("c:3")}},
        )
    )
    merged = dockerconfig.merge(modern, legacy)
    assert dockerconfig.authorization_for(merged, "ghcr.io/org/app") == basic("a", "1")
    assert dockerconfig.authorization_for(merged, "quay.io/org/app") == basic("c", "3")
    as_string = dockerconfig.from_secret(
        {"type": "kubernetes.io/dockerconfigjson", "stringData": {".dockerconfigjson": json.dumps(CONFIG)}}
    )
    assert "registry.corp:5000" in as_string


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"type": "Opaque", "data": {"token": b64("x")}}, "not a pull secret"),
        ({"type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": "%%%"}}, "not base64"),
        ({"type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": b64("{nope")}}, "not JSON"),
        ({"type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": b64("[]")}}, "JSON object"),
    ],
)
def test_bad_secrets_say_what_is_wrong(bad, message):
    with pytest.raises(DockerConfigError, match=message):
        dockerconfig.from_secret(bad)


@pytest.mark.parametrize(
    "auths",
    [
        {"ghcr.io": "not-an-object"},
        {"ghcr.io": {"auth": "!!!"}},
        {"ghcr.io": {"auth": b64("no-colon")}},
        ["a", "list"],
    ],
)
def test_bad_entries_are_refused(auths):
    with pytest.raises(DockerConfigError):
        dockerconfig.parse_config({"auths": auths})


def test_credentials_never_show_the_password():
    entry = RegistryCredentials("ghcr.io", "me", "hunter2")
    assert "hunter2" not in repr(entry)


@given(
    user=st.text(
        st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), min_size=1, max_size=20
    ),
    password=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
)
def test_auth_round_trips_through_the_header(user, password):
    creds = dockerconfig.parse_config({"auths": {"ghcr.io": {"auth": b64(f"{user}:{password}")}}})
    header = dockerconfig.authorization_for(creds, "ghcr.io/x/y")
    assert header is not None
    decoded = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert decoded == f"{user}:{password}"
