"""The proxy's edge parsing: request paths, Range headers, client credentials, auth challenges."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import routes
from proxy.errors import RegistryError
from proxy.ranges import parse_range
from proxy.upstream.auth import TokenCache, credentials_from_header, parse_challenge

DIGEST = "sha256:" + "a" * 64


def test_ns_naming_the_proxy_itself_is_rewrite_mode():
    """containerd adds `ns=<host>` for the proxy's own hosts.toml too: the path then carries the registry."""
    own = frozenset({"localhost:7439"})
    path = "/v2/registry.corp_5000/team/app/manifests/1"
    expected = routes.Target(routes.Kind.MANIFEST, "registry.corp:5000", "team/app", "1")
    assert routes.parse(path, "localhost:7439", own) == expected
    assert routes.parse(path, "LOCALHOST:7439", own) == expected
    mirror = routes.parse("/v2/team/app/manifests/1", "registry.corp:5000", own)
    assert mirror == expected


@pytest.mark.parametrize(
    "path, ns, expected",
    [
        ("/v2/", None, routes.Target(routes.Kind.BASE)),
        (
            "/v2/docker.io/library/nginx/manifests/1.27",
            None,
            routes.Target(routes.Kind.MANIFEST, "docker.io", "library/nginx", "1.27"),
        ),
        (
            "/v2/docker.io/nginx/manifests/1.27",
            None,
            routes.Target(routes.Kind.MANIFEST, "docker.io", "library/nginx", "1.27"),
        ),
        (
            "/v2/registry.corp_5000/team/app/blobs/" + DIGEST,
            None,
            routes.Target(routes.Kind.BLOB, "registry.corp:5000", "team/app", DIGEST),
        ),
        (
            "/v2/registry.corp:5000/app/manifests/" + DIGEST,
            None,
            routes.Target(routes.Kind.MANIFEST, "registry.corp:5000", "app", DIGEST),
        ),
        (
            "/v2/library/nginx/manifests/latest",
            "docker.io",
            routes.Target(routes.Kind.MANIFEST, "docker.io", "library/nginx", "latest"),
        ),
        (
            "/v2/app/blobs/" + DIGEST,
            "127.0.0.1:5000",
            routes.Target(routes.Kind.BLOB, "127.0.0.1:5000", "app", DIGEST),
        ),
    ],
)
def test_paths_parse_once_into_targets(path, ns, expected):
    assert routes.parse(path, ns) == expected


@pytest.mark.parametrize(
    "path, code",
    [
        ("/v2/docker.io/../etc/manifests/v1", "NAME_INVALID"),
        ("/v2/docker.io/a/../b/manifests/v1", "NAME_INVALID"),
        ("/v2/docker.io/UPPER/manifests/v1", "NAME_INVALID"),
        ("/v2/docker.io/app/blobs/sha256:short", "DIGEST_INVALID"),
        ("/v2/docker.io/app/blobs/latest", "DIGEST_INVALID"),
        ("/v2/docker.io/app/manifests/md5:" + "a" * 32, "DIGEST_INVALID"),
        ("/v2/docker.io/app/manifests/-bad", "NAME_INVALID"),
        ("/v2/bad host/app/manifests/v1", "NAME_INVALID"),
        ("/v2/docker.io/manifests/v1", "NAME_INVALID"),
        ("/v2/docker.io/app/tags/list", "NAME_UNKNOWN"),
        ("/other", "NAME_UNKNOWN"),
    ],
)
def test_bad_paths_are_oci_errors(path, code):
    with pytest.raises(RegistryError) as caught:
        routes.parse(path)
    assert caught.value.code == code
    assert caught.value.status in (400, 404)


@given(st.text(max_size=80))
def test_any_path_parses_or_raises_a_registry_error(text):
    try:
        target = routes.parse("/v2/" + text)
    except RegistryError as exc:
        assert exc.status in (400, 404)
        return
    assert ".." not in target.repository and "//" not in target.repository


@pytest.mark.parametrize(
    "header, size, expected",
    [
        (None, 10, None),
        ("bytes=0-4", 10, (0, 4)),
        ("bytes=5-", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=8-100", 10, (8, 9)),
        ("bytes=-100", 10, (0, 9)),
        ("items=1-2", 10, None),
        ("bytes=1-2,4-5", 10, None),
    ],
)
def test_ranges(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=5-4", "bytes=-0"])
def test_unsatisfiable_ranges_are_416(header):
    with pytest.raises(RegistryError) as caught:
        parse_range(header, 10)
    assert caught.value.status == 416 and caught.value.headers["Content-Range"] == "bytes */10"


@given(st.integers(0, 1000), st.integers(0, 1000), st.integers(1, 1000))
def test_satisfiable_ranges_stay_inside_the_blob(first, last, size):
    try:
        span = parse_range(f"bytes={first}-{last}", size)
    except RegistryError:
        assert first >= size or last < first
        return
    assert span is not None and 0 <= span[0] <= span[1] < size


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_client_credentials():
    creds = credentials_from_header(basic("alice:pa:ss"))
    assert creds is not None and (creds.username, creds.password) == ("alice", "pa:ss")
    assert "pa:ss" not in repr(creds) and len(creds.key) == 32
    assert credentials_from_header(basic(":")) is None  # empty basic: anonymous
    assert credentials_from_header("Bearer abc") is None
    assert credentials_from_header("Basic !!!") is None
    assert credentials_from_header(None) is None


def test_challenges():
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull"'
    )
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/nginx:pull",
    }
    assert parse_challenge('Basic realm="x"').scheme == "basic"
    assert parse_challenge("") is None


def test_token_cache_expires():
    now = [0.0]
    cache = TokenCache(now=lambda: now[0])
    cache.put(("k",), "tok", expires_in=300)
    assert cache.get(("k",)) == "tok"
    now[0] = 289.0
    assert cache.get(("k",)) == "tok"
    now[0] = 291.0  # renewed before the stated expiry
    assert cache.get(("k",)) is None


DOT_SEGMENT_PATHS = [
    "/v2/docker.io/app/blobs/" + DIGEST + "/..",
    "/v2/docker.io/app/blobs/" + DIGEST + "/.",
    "/v2/docker.io/app/manifests/v1/..",
    "/v2/../docker.io/app/manifests/v1",
    "/v2/./docker.io/app/manifests/v1",
    "/v2/docker.io/./app/blobs/" + DIGEST,
    "/v2/docker.io/app/../blobs/" + DIGEST,
    "/v2/docker.io/app/blobs/..",
    "/v2/..",
    "/v2/.",
]


@pytest.mark.parametrize("path", DOT_SEGMENT_PATHS)
@pytest.mark.parametrize("ns", [None, "docker.io"])
def test_dot_segments_are_name_invalid_wherever_they_are(path, ns):
    with pytest.raises(RegistryError) as caught:
        routes.parse(path, ns)
    assert (caught.value.code, caught.value.status) == ("NAME_INVALID", 400)


_SEGMENT = st.sampled_from(["docker.io", "app", "team", "manifests", "blobs", DIGEST, "v1", "", "x_1"])


@given(
    st.lists(_SEGMENT, max_size=6),
    st.sampled_from([".", ".."]),
    st.lists(_SEGMENT, max_size=6),
    st.sampled_from([None, "docker.io"]),
)
def test_a_path_with_a_dot_segment_anywhere_is_name_invalid(before, dots, after, ns):
    path = "/v2/" + "/".join([*before, dots, *after])
    with pytest.raises(RegistryError) as caught:
        routes.parse(path, ns)
    assert (caught.value.code, caught.value.status) == ("NAME_INVALID", 400)
