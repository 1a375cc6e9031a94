"""`imagewarm.digest`: the one digest value, parsed once."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagewarm.digest import Digest, InvalidDigest

HEX = "0123456789abcdef"


def test_parse_of_and_the_wire_form() -> None:
    digest = Digest.parse("sha256:" + "a" * 64)
    assert (digest.algorithm, digest.hex, str(digest)) == ("sha256", "a" * 64, "sha256:" + "a" * 64)
    assert Digest.of(b"x") == Digest.parse("sha256:" + hashlib.sha256(b"x").hexdigest())
    assert str(Digest.of(b"x", "sha512")) == "sha512:" + hashlib.sha512(b"x").hexdigest()
    assert digest.flat == "sha256-" + "a" * 64 and Digest.from_flat(digest.flat) == digest


def test_hasher_and_matches() -> None:
    digest = Digest.of(b"content", "sha512")
    hashed = digest.hasher()
    hashed.update(b"content")
    assert hashed.name == "sha512" and digest.matches(hashed)
    other = digest.hasher()
    other.update(b"other")
    assert not digest.matches(other)
    assert not Digest.parse("sha256:" + hashlib.sha256(b"content").hexdigest()).matches(hashed)


@pytest.mark.parametrize(
    "text, said",
    [
        ("sha256:" + "a" * 63, "expected 64 lower-case hex characters, got 63"),
        ("sha256:" + "A" * 64, "with upper-case"),
        ("sha384:" + "a" * 96, "unsupported digest algorithm 'sha384'"),
        ("md5:" + "0" * 32, "unsupported digest algorithm 'md5'"),
        ("latest", "a digest is ALGORITHM:HEX"),
        ("sha256:../../etc", "a digest is ALGORITHM:HEX"),
        ("", "a digest is ALGORITHM:HEX"),
    ],
)
def test_what_cannot_be_verified_is_refused_saying_why(text: str, said: str) -> None:
    with pytest.raises(InvalidDigest, match=said):
        Digest.parse(text)
    with pytest.raises(InvalidDigest, match=f"in 'app@{text}'"):
        Digest.parse(text, within=f"app@{text}")


def test_parse_refuses_what_is_not_text() -> None:
    with pytest.raises(InvalidDigest, match="not bytes"):
        Digest.parse(b"sha256:" + b"a" * 64)  # type: ignore[arg-type]


@given(st.sampled_from(["sha256", "sha512"]), st.binary(max_size=64))
def test_wire_and_flat_forms_round_trip(algorithm: str, data: bytes) -> None:
    digest = Digest.of(data, algorithm)
    assert Digest.parse(str(digest)) == digest
    assert Digest.from_flat(digest.flat) == digest


@given(st.text(max_size=140))
def test_any_text_parses_to_a_verifiable_digest_or_is_refused(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except InvalidDigest:
        return
    assert str(digest) == text and len(digest.hex) == {"sha256": 64, "sha512": 128}[digest.algorithm]
    assert set(digest.hex) <= set(HEX)
