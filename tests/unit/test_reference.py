"""imagewarm.reference: the distribution grammar (table from its own tests), the proxied form, and
properties over references generated from the grammar."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from imagewarm import reference
from imagewarm.reference import (
    InvalidReference,
    Reference,
    Unproxiable,
    from_proxied,
    is_proxied,
    parse,
    parse_registry_segment,
    registry_endpoint,
    registry_segment,
    to_proxied,
)
from tests.unit.reference_cases import D256, INVALID, REDIS, VALID, Invalid, Valid


@pytest.mark.parametrize("case", VALID, ids=[c.text[:70] for c in VALID])
def test_valid_references_parse_to_their_normalised_parts(case: Valid) -> None:
    ref = parse(case.text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        case.registry,
        case.repository,
        case.tag,
        case.digest,
    )
    assert ref.name == f"{case.registry}/{case.repository}"
    assert parse(str(ref)) == ref


@pytest.mark.parametrize("case", INVALID, ids=[c.text[:70] for c in INVALID])
def test_invalid_references_are_rejected_naming_the_offending_part(case: Invalid) -> None:
    with pytest.raises(InvalidReference) as raised:
        parse(case.text)
    assert case.message in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_canonical_form_keeps_tag_and_digest() -> None:
    assert str(parse("nginx:1.27@" + REDIS)) == "docker.io/library/nginx:1.27@" + REDIS
    assert str(parse("registry.corp:5000/team/app")) == "registry.corp:5000/team/app"


@pytest.mark.parametrize(
    ("text", "familiar"),
    [
        ("docker.io/library/redis", "redis"),
        ("docker.io/library/redis:7@" + REDIS, "redis:7@" + REDIS),
        ("docker.io/dmcgowan/myapp", "dmcgowan/myapp"),
        ("docker.io/0.0/0", "docker.io/0.0/0"),
        ("docker.io/localhost/x", "docker.io/localhost/x"),
        ("library/foo/bar", "library/foo/bar"),
        ("127.0.0.1:8000/privatebase", "127.0.0.1:8000/privatebase"),
        ("example.com/private/moonbase:1", "example.com/private/moonbase:1"),
    ],
)
def test_familiar_is_dockers_short_form(text: str, familiar: str) -> None:
    assert parse(text).familiar == familiar
    assert parse(familiar) == parse(text)


def test_with_tag_and_with_digest_validate() -> None:
    ref = parse("nginx:1.27")
    assert str(ref.with_tag("1.28")) == "docker.io/library/nginx:1.28"
    assert str(ref.with_tag(None).with_digest(D256)) == "docker.io/library/nginx@" + D256
    assert ref.with_digest(D256).with_digest(None) == ref
    with pytest.raises(InvalidReference, match="invalid tag 'a b'"):
        ref.with_tag("a b")
    with pytest.raises(InvalidReference, match="unsupported digest algorithm 'md5'"):
        ref.with_digest("md5:" + "0" * 32)


def test_non_text_is_an_invalid_reference() -> None:
    with pytest.raises(InvalidReference, match="not NoneType"):
        parse(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidReference, match="not list"):
        parse(["nginx"])  # type: ignore[arg-type]


# The proxied form.


@pytest.mark.parametrize(
    ("text", "proxied"),
    [
        ("nginx:1.27@" + REDIS, "localhost:7439/docker.io/library/nginx:1.27@" + REDIS),
        ("nginx", "localhost:7439/docker.io/library/nginx"),
        ("index.docker.io/user/app:v1", "localhost:7439/docker.io/user/app:v1"),
        ("registry.corp:5000/app:1", "localhost:7439/registry.corp_5000/app:1"),
        ("Registry.CORP:5000/team/app", "localhost:7439/registry.corp_5000/team/app"),
        ("localhost/foo", "localhost:7439/localhost/foo"),
        ("localhost:5000/foo", "localhost:7439/localhost_5000/foo"),
        ("127.0.0.1:5000/x@" + D256, "localhost:7439/127.0.0.1_5000/x@" + D256),
        ("xn--n3h.com/myimage", "localhost:7439/xn--n3h.com/myimage"),
    ],
)
def test_to_proxied_and_back(text: str, proxied: str) -> None:
    assert to_proxied(text) == proxied
    assert to_proxied(parse(text)) == proxied
    assert from_proxied(proxied) == parse(text)
    assert is_proxied(proxied)
    assert not is_proxied(text)
    assert parse(proxied).registry == "localhost:7439"


def test_to_proxied_with_another_prefix() -> None:
    assert to_proxied("nginx", prefix="127.0.0.1:17439") == "127.0.0.1:17439/docker.io/library/nginx"
    assert to_proxied("nginx", prefix="Cache.Local/mirror") == "cache.local/mirror/docker.io/library/nginx"
    assert from_proxied("cache.local/mirror/docker.io/library/nginx", prefix="cache.local/mirror") == parse(
        "nginx"
    )
    assert from_proxied("localhost:7439/docker.io/library/nginx", prefix="127.0.0.1:17439") is None


@pytest.mark.parametrize(
    "prefix", ["", "cache", "Cache/x", "[::1]:7439", "localhost:port", "localhost:7439/"]
)
def test_invalid_proxy_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid proxy prefix"):
        to_proxied("nginx", prefix=prefix)


def test_ipv6_registry_is_unproxiable() -> None:
    with pytest.raises(Unproxiable, match="IPv6"):
        to_proxied("[2001:db8::1]:5000/x")
    with pytest.raises(Unproxiable, match="IPv6"):
        registry_segment("[::1]")


def test_name_over_255_once_prefixed_is_unproxiable() -> None:
    # 255 characters parsed; 255 - len("x.io") + len("localhost:7439/x.io") over the limit.
    longest = "x.io/" + "a" * 250
    assert len(parse(longest).name) == 255
    with pytest.raises(Unproxiable, match="270 characters"):
        to_proxied(longest)
    # Exactly at the limit once prefixed.
    fits = "x.io/" + "a" * (255 - len("localhost:7439/x.io/"))
    assert len(to_proxied(fits)) == 255
    assert from_proxied(to_proxied(fits)) == parse(fits)


@pytest.mark.parametrize(
    "text",
    [
        "nginx",  # not under the prefix
        "localhost:7440/docker.io/library/nginx",  # another port
        "localhost:7439/docker.io",  # no repository after the segment (parses as library-less)
        "localhost:7439/foo/bar",  # 'foo' would not be read as a registry by parse()
        "localhost:7439/reg_istry.corp_5000/app",  # not a host
        "localhost:7439/registry.corp_50x0/app",  # not a port
        "Not A Reference",
        "",
    ],
)
def test_from_proxied_is_none_when_not_a_proxied_reference(text: str) -> None:
    assert from_proxied(text) is None


def test_is_proxied_even_when_not_decodable_so_never_rewritten_twice() -> None:
    assert is_proxied("localhost:7439/foo/bar")
    assert is_proxied("localhost:7439/docker.io/library/nginx:1")
    assert not is_proxied("localhost:7440/docker.io/library/nginx")
    assert not is_proxied("localhost/docker.io/library/nginx")
    assert not is_proxied("not valid!")


def test_from_proxied_normalises_a_hand_written_docker_hub_name() -> None:
    assert from_proxied("localhost:7439/docker.io/nginx:1") == parse("nginx:1")
    assert from_proxied("localhost:7439/index.docker.io/nginx") == parse("nginx")


@pytest.mark.parametrize(
    ("segment", "registry"),
    [
        ("docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry.corp_5000", "registry.corp:5000"),
        ("registry.corp:5000", "registry.corp:5000"),
        ("Registry.Corp_5000", "registry.corp:5000"),
        ("localhost", "localhost"),
        ("localhost_5000", "localhost:5000"),
        ("127.0.0.1_5000", "127.0.0.1:5000"),
        ("[::1]:5000", "[::1]:5000"),
        ("ghcr.io", "ghcr.io"),
    ],
)
def test_parse_registry_segment_accepts_host_host_port_and_host_colon_port(
    segment: str, registry: str
) -> None:
    assert parse_registry_segment(segment) == registry


@pytest.mark.parametrize(
    "segment",
    ["", "_5000", "reg_istry.corp", "registry.corp_", "registry.corp_5x", "a b", "-x.io", "x.io_1_2"],
)
def test_parse_registry_segment_rejects_anything_else(segment: str) -> None:
    with pytest.raises(InvalidReference, match="invalid registry segment"):
        parse_registry_segment(segment)


def test_registry_segment_and_endpoint() -> None:
    assert registry_segment("registry.corp:5000") == "registry.corp_5000"
    assert registry_segment("Quay.IO") == "quay.io"
    with pytest.raises(InvalidReference, match="invalid registry 'no_such host'"):
        registry_segment("no_such host")
    assert registry_endpoint("docker.io") == "registry-1.docker.io"
    assert registry_endpoint("index.docker.io") == "registry-1.docker.io"
    assert registry_endpoint("registry.corp:5000") == "registry.corp:5000"
    assert registry_endpoint("ghcr.io") == "ghcr.io"


# Properties over references generated from the grammar.

_LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_HOST_CHARS = _LOWER_ALNUM + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX = "0123456789abcdef"

alphanumerics = st.text(_LOWER_ALNUM, min_size=1, max_size=6)
separators = st.sampled_from([".", "_", "__", "-", "--", "---"])
path_components = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    alphanumerics,
    st.lists(st.tuples(separators, alphanumerics), max_size=3),
)
repositories = st.lists(path_components, min_size=1, max_size=4).map("/".join)
domain_labels = st.builds(
    lambda edge, middle, end: edge + middle + end if middle or end else edge,
    st.text(_HOST_CHARS, min_size=1, max_size=1),
    st.text(_HOST_CHARS + "-", max_size=6),
    st.text(_HOST_CHARS, max_size=1),
).filter(lambda label: not label.endswith("-"))
domain_names = st.lists(domain_labels, min_size=1, max_size=4).map(".".join)
ports = st.integers(0, 99999).map(str)
ipv6_literals = (
    st.ip_addresses(v=6)
    .map(lambda address: f"[{address}]")
    .filter(lambda text: "." not in text and "%" not in text)
)


@st.composite
def registries(draw: st.DrawFn) -> str:
    """A host[:port] that parse() reads as a registry: it has a '.', a port, or is `localhost`."""
    host = draw(st.one_of(domain_names, ipv6_literals, st.just("localhost")))
    port = draw(st.none() | ports)
    if port is None and "." not in host and host != "localhost" and not host.startswith("["):
        port = "5000"
    return host if port is None else f"{host}:{port}"


tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digests = st.one_of(
    st.text(_HEX, min_size=64, max_size=64).map(lambda hex_: "sha256:" + hex_),
    st.text(_HEX, min_size=128, max_size=128).map(lambda hex_: "sha512:" + hex_),
)


@st.composite
def references(draw: st.DrawFn) -> tuple[str, Valid]:
    """Text of a valid reference and what it must parse to (the generator is the oracle)."""
    repository = draw(repositories)
    form = draw(st.sampled_from(["familiar", "docker.io", "index.docker.io", "registry"]))
    if form == "registry":
        registry = draw(registries())
        text, expected_registry = f"{registry}/{repository}", registry.lower()
        if expected_registry == "index.docker.io":
            expected_registry = "docker.io"
    else:
        text = repository if form == "familiar" else f"{form}/{repository}"
        expected_registry = "docker.io"
        # Without a registry the first component must not look like one.
        assume(form != "familiar" or "/" not in repository or not _looks_like_registry(repository))
    expected_repository = repository
    if expected_registry == "docker.io" and "/" not in repository:
        expected_repository = "library/" + repository
    tag = draw(st.none() | tags)
    digest = draw(st.none() | digests)
    text += (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest is not None else "")
    assume(len(text) != 64 or tag is not None or digest is not None)
    assume(len(f"{expected_registry}/{expected_repository}") <= 255)
    return text, Valid(text, expected_registry, expected_repository, tag, digest)


def _looks_like_registry(repository: str) -> bool:
    first = repository.split("/", 1)[0]
    return "." in first or first == "localhost"


@given(references())
def test_generated_references_parse_to_their_parts(generated: tuple[str, Valid]) -> None:
    text, expected = generated
    ref = parse(text)
    assert ref == Reference(expected.registry, expected.repository, expected.tag, expected.digest)


@given(references())
def test_canonical_form_parses_back_to_the_same_reference(generated: tuple[str, Valid]) -> None:
    ref = parse(generated[0])
    assert parse(str(ref)) == ref
    assert parse(ref.familiar) == ref


@given(references())
def test_proxied_round_trip(generated: tuple[str, Valid]) -> None:
    ref = parse(generated[0])
    try:
        proxied = to_proxied(ref)
    except Unproxiable:
        assert ref.registry.startswith("[") or len(ref.name) > 255 - len("localhost:7439/")
        return
    assert parse(proxied).registry == "localhost:7439"
    assert (parse(proxied).tag, parse(proxied).digest) == (ref.tag, ref.digest)
    assert from_proxied(proxied) == ref
    assert is_proxied(proxied)


@given(st.text(max_size=80))
def test_random_text_raises_nothing_but_invalid_reference(text: str) -> None:
    try:
        ref = parse(text)
    except InvalidReference:
        return
    assert parse(str(ref)) == ref


_REFERENCE_ALPHABET = _LOWER_ALNUM + "ABCXYZ:/@._-[]" + "sha256"


@given(st.text(_REFERENCE_ALPHABET, max_size=60))
def test_reference_like_text_raises_nothing_but_invalid_reference(text: str) -> None:
    try:
        ref = parse(text)
    except InvalidReference:
        assert from_proxied(text) is None
        return
    assert parse(str(ref)) == ref
    try:
        proxied = to_proxied(ref)
    except Unproxiable:
        return
    assert from_proxied(proxied) == ref


@given(references(), st.integers(0, 80), st.sampled_from(list("A:/@ +%[]\n\x00é_-.")))
def test_mutated_references_raise_nothing_but_invalid_reference(
    generated: tuple[str, Valid], position: int, character: str
) -> None:
    text = generated[0]
    position = min(position, len(text))
    mutated = text[:position] + character + text[position:]
    try:
        ref = parse(mutated)
    except InvalidReference:
        return
    assert parse(str(ref)) == ref


def test_parse_is_cached_for_the_webhooks_hot_path() -> None:
    assert parse("nginx:1.27") is parse("nginx:1.27")


def test_digests_in_references_are_only_verifiable_ones() -> None:
    assert parse("app@sha512:" + "0" * 128).digest == "sha512:" + "0" * 128
    for bad, said in [
        ("sha256:" + "a" * 63, "expected 64"),
        ("sha256:" + "A" * 64, "upper-case"),
        ("sha384:" + "a" * 96, "unsupported digest algorithm"),
        ("latest", "ALGORITHM:HEX"),
    ]:
        with pytest.raises(reference.InvalidReference, match=said):
            parse(f"app@{bad}")


def test_check_tag() -> None:
    assert reference.check_tag("v1.2_rc-3") == "v1.2_rc-3"
    for bad in ("", "-x", "a+b", "t" * 129):
        with pytest.raises(reference.InvalidReference, match="tags are"):
            reference.check_tag(bad)
