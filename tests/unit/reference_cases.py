"""Image reference cases, most taken from distribution/reference's own tests (reference_test.go,
normalize_test.go, regexp_test.go), written as our table: what the kubelet accepts and how it
normalises it, and what it rejects (with a fragment the error message must contain)."""

from __future__ import annotations

from typing import NamedTuple

H64 = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
D256 = "sha256:" + H64
D512 = "sha512:" + "f" * 128
REDIS = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"


class Valid(NamedTuple):
    text: str
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None


class Invalid(NamedTuple):
    text: str
    message: str  # a fragment the InvalidReference message must contain


VALID = [
    # Docker Hub normalisation.
    Valid("nginx", "docker.io", "library/nginx"),
    Valid("nginx:1.27", "docker.io", "library/nginx", "1.27"),
    Valid("docker.io/nginx", "docker.io", "library/nginx"),
    Valid("docker.io/library/nginx", "docker.io", "library/nginx"),
    Valid("index.docker.io/library/nginx", "docker.io", "library/nginx"),
    Valid("index.docker.io/debian", "docker.io", "library/debian"),
    Valid("index.docker.io/docker/docker", "docker.io", "docker/docker"),
    Valid("docker/docker", "docker.io", "docker/docker"),
    Valid("library/debian", "docker.io", "library/debian"),
    Valid("library/foo/bar", "docker.io", "library/foo/bar"),
    Valid("docker.io/library/foo/bar", "docker.io", "library/foo/bar"),
    Valid("store/foo/bar", "docker.io", "store/foo/bar"),
    Valid("other/library", "docker.io", "other/library"),
    Valid("ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base"),
    Valid("test_com", "docker.io", "library/test_com"),
    Valid("test_com/foo", "docker.io", "test_com/foo"),
    Valid("dbcc1", "docker.io", "library/dbcc1"),
    # 63 hex characters is a name; 64 would be an identifier.
    Valid(H64[:63], "docker.io", "library/" + H64[:63]),
    Valid("docker.io/" + H64, "docker.io", "library/" + H64),
    Valid(
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        "docker.io",
        "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
    ),
    # Separators in path components.
    Valid("docker-rules/docker", "docker.io", "docker-rules/docker"),
    Valid("docker---rules/docker", "docker.io", "docker---rules/docker"),
    Valid("dock__er/docker", "docker.io", "dock__er/docker"),
    Valid("d/docker", "docker.io", "d/docker"),
    Valid("jess/t", "docker.io", "jess/t"),
    Valid("e/a.b_c-d", "docker.io", "e/a.b_c-d"),
    # Without a '/', a host-looking name is a Docker Hub repository and the ':' starts a tag.
    Valid("test.com:tag", "docker.io", "library/test.com", "tag"),
    Valid("test.com:5000", "docker.io", "library/test.com", "5000"),
    Valid("localhost:5000", "docker.io", "library/localhost", "5000"),
    Valid("localhost", "docker.io", "library/localhost"),
    Valid("192.168.0.1", "docker.io", "library/192.168.0.1"),
    Valid("192.168.0.1:80", "docker.io", "library/192.168.0.1", "80"),
    Valid("foo_bar.com:8080", "docker.io", "library/foo_bar.com", "8080"),
    Valid("foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", "8080"),
    # Registry detection: '.', ':' or exactly localhost.
    Valid("localhost/foo", "localhost", "foo"),
    Valid("localhost:5000/foo", "localhost:5000", "foo"),
    Valid("test.com/foo", "test.com", "foo"),
    Valid("test.com/repo:tag", "test.com", "repo", "tag"),
    Valid("test:5000/repo", "test:5000", "repo"),
    Valid("test-com:8080/foo", "test-com:8080", "foo"),
    Valid("test:5000/repo:tag", "test:5000", "repo", "tag"),
    Valid("test:5000/repo@" + D256, "test:5000", "repo", None, D256),
    Valid("test:5000/repo:tag@" + D256, "test:5000", "repo", "tag", D256),
    Valid("127.0.0.1:5000/x", "127.0.0.1:5000", "x"),
    Valid("127.0.0.1:5000/library/debian", "127.0.0.1:5000", "library/debian"),
    Valid("127.0.0.1:8000/private/moonbase", "127.0.0.1:8000", "private/moonbase"),
    Valid("192.168.1.1/repo", "192.168.1.1", "repo"),
    Valid("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050"),
    Valid("192.168.0.1:8/debian", "192.168.0.1:8", "debian"),
    Valid("example.com/privatebase", "example.com", "privatebase"),
    Valid("example.com:8000/private/moonbase", "example.com:8000", "private/moonbase"),
    Valid("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com", "bar/baz/quux", "some-long-tag"),
    Valid(
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io",
        "test.example.com/my-app",
        "test.example.com",
    ),
    Valid("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com"),
    Valid("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo"),
    Valid("xn--7o8h.com/myimage:xn--7o8h.com@" + D512, "xn--7o8h.com", "myimage", "xn--7o8h.com", D512),
    Valid("registry.corp:5000/app:1", "registry.corp:5000", "app", "1"),
    # Host names are case-insensitive: lower-cased. docker.io/index.docker.io compared after that.
    Valid("Registry.Corp:5000/app", "registry.corp:5000", "app"),
    Valid("EXAMPLE.COM/foo", "example.com", "foo"),
    Valid("INDEX.DOCKER.IO/nginx", "docker.io", "library/nginx"),
    # IPv6 literal hosts in brackets.
    Valid("[2001:db8::1]:5000/x", "[2001:db8::1]:5000", "x"),
    Valid("[2001:db8::1]/repo", "[2001:db8::1]", "repo"),
    Valid("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag"),
    Valid("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo"),
    Valid("[::1]:5000/foo", "[::1]:5000", "foo"),
    Valid("[fc00::1]:5000/docker/docker", "[fc00::1]:5000", "docker/docker"),
    Valid("[2001:db8::1]:5000/repo:tag@" + D256, "[2001:db8::1]:5000", "repo", "tag", D256),
    Valid("[FC00::1]:5000/docker", "[fc00::1]:5000", "docker"),
    # Tags: upper case allowed, 128 characters at most.
    Valid("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase"),
    Valid("nginx:_x", "docker.io", "library/nginx", "_x"),
    Valid("nginx:" + "a" * 128, "docker.io", "library/nginx", "a" * 128),
    # Digests and tag+digest.
    Valid("nginx@" + REDIS, "docker.io", "library/nginx", None, REDIS),
    Valid("nginx:1.27@" + REDIS, "docker.io", "library/nginx", "1.27", REDIS),
    Valid("busybox:latest@" + REDIS, "docker.io", "library/busybox", "latest", REDIS),
    Valid("dmcgowan/myapp@" + REDIS, "docker.io", "dmcgowan/myapp", None, REDIS),
    Valid(
        "other.com/named@sha512:" + "0123456789abcdef" * 8,
        "other.com",
        "named",
        None,
        "sha512:" + "0123456789abcdef" * 8,
    ),
    # Length: the whole normalised name may be 255 characters, not 256.
    Valid("x.io/" + "a" * 250, "x.io", "a" * 250),
    Valid("docker.io/u/" + "a" * 243, "docker.io", "u/" + "a" * 243),
]

INVALID = [
    Invalid("", "empty image reference"),
    Invalid(":justtag", "empty path component"),
    Invalid("@" + D256, "empty path component"),
    Invalid(H64, "64-hex identifier"),
    Invalid("https://github.com/docker/docker", "invalid registry 'https:'"),
    # Upper case in the path; and an upper-case first component is not a registry for us.
    Invalid("Uppercase:tag", "must be lower-case"),
    Invalid("Foo/bar", "invalid repository 'Foo/bar'"),
    Invalid("FOO/bar", "a registry host needs a '.'"),
    Invalid("Docker/docker", "must be lower-case"),
    Invalid("foo/Bar", "invalid repository 'foo/Bar'"),
    Invalid("docker/Docker", "must be lower-case"),
    Invalid("docker.io/docker/Docker", "must be lower-case"),
    Invalid("test:5000/Uppercase/lowercase:tag", "must be lower-case"),
    # Path components.
    Invalid("-docker", "invalid path component '-docker'"),
    Invalid("-docker/docker", "invalid path component '-docker'"),
    Invalid("docker-/docker", "invalid path component 'docker-'"),
    Invalid("-docker-/docker", "invalid path component"),
    Invalid("docker///docker", "empty path component"),
    Invalid("docker.io/docker///docker", "empty path component"),
    Invalid("docker/", "empty path component"),
    Invalid("____/____", "invalid path component '____'"),
    Invalid("_docker/_docker", "invalid path component '_docker'"),
    Invalid("dock..er/docker", "invalid registry 'dock..er'"),
    Invalid("docker/dock..er", "invalid path component 'dock..er'"),
    Invalid("dock_.er/docker", "invalid registry 'dock_.er'"),
    Invalid("docker/dock_.er", "invalid path component 'dock_.er'"),
    Invalid("dock-.er/docker", "invalid registry 'dock-.er'"),
    Invalid("docker/dock-.er", "invalid path component 'dock-.er'"),
    Invalid("dock___er/docker", "invalid path component 'dock___er'"),
    Invalid("aa/asdf$$^/aa", "invalid path component 'asdf$$^'"),
    Invalid(" nginx", "invalid path component ' nginx'"),
    Invalid("nginx\n", "invalid path component 'nginx\n'"),
    Invalid("ngïnx", "invalid path component"),
    # Registries.
    Invalid("-docker.io/docker/docker", "invalid registry '-docker.io'"),
    Invalid("foo_bar.com/x", "invalid registry 'foo_bar.com'"),
    Invalid("a.b_c-d/e", "invalid registry 'a.b_c-d'"),
    Invalid("example.com:port/x", "invalid registry 'example.com:port'"),
    Invalid("fc00::1:5000/debian", "invalid registry 'fc00::1:5000'"),
    Invalid("[fc00::1]", "names a registry but no repository"),
    Invalid("[fc00::1]:5000", "names a registry but no repository"),
    Invalid("[2001:db8::1]:tag", "names a registry but no repository"),
    Invalid("[fe80::1%eth0]:5000/debian", "invalid registry '[fe80::1%eth0]:5000'"),
    Invalid("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid registry"),
    # Tags.
    Invalid("nginx:a+b", "invalid tag 'a+b' in 'nginx:a+b': tags are [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"),
    Invalid("nginx:", "invalid tag ''"),
    Invalid("nginx:-x", "invalid tag '-x'"),
    Invalid("nginx:.x", "invalid tag '.x'"),
    Invalid("nginx:" + "a" * 129, "invalid tag"),
    Invalid("nginx:ünï", "invalid tag"),
    Invalid("foo/bar:baz:qux", "invalid tag 'baz:qux'"),
    # Digests: the grammar, then only sha256 (64 hex) and sha512 (128 hex), lower-case.
    Invalid("nginx@sha256:" + H64[:63], "expected 64 lower-case hex characters, got 63"),
    Invalid("nginx@sha256:" + H64 + "f", "expected 64 lower-case hex characters, got 65"),
    Invalid("repo@sha256:ffffffffffffffffffffffffffffffffff", "got 34"),
    Invalid("nginx@sha512:" + H64, "expected 128 lower-case hex characters, got 64"),
    Invalid("nginx@sha256:" + H64.upper(), "with upper-case"),
    Invalid("nginx@sha256:" + "g" * 64, "invalid digest"),
    Invalid("nginx@sha256:abc", "invalid digest"),
    Invalid("nginx@" + H64, "invalid digest"),
    Invalid("nginx@", "invalid digest ''"),
    Invalid("validname@invaliddigest:" + H64, "unsupported digest algorithm 'invaliddigest'"),
    Invalid("nginx@sha384:" + "f" * 96, "unsupported digest algorithm 'sha384'"),
    Invalid("nginx@sha256+b64:" + H64, "unsupported digest algorithm 'sha256+b64'"),
    Invalid("nginx@1sha:" + H64, "invalid digest"),
    Invalid("nginx:tag@sha256:" + H64 + "@x", "invalid digest"),
    # Length: 256 characters once normalised, and texts too long to be anything.
    Invalid("a/" * 128 + "a:tag", "is 267 characters long"),
    Invalid("a/" * 127 + "a:tag-puts-this-over-max", "is 265 characters long"),
    Invalid("x.io/" + "a" * 251, "is 256 characters long: the limit is 255"),
    Invalid("docker.io/u/" + "a" * 244, "is 256 characters long"),
    Invalid("u/" + "a" * 244, "is 256 characters long"),
    Invalid("nginx:" + "a" * 1000, "is 1006 characters long"),
]
