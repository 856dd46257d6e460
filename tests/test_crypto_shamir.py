"""Shamir sharing of the keyring's sealing key: any M of N rebuild it, M-1 do not.

Field checks include the fixed values of HashiCorp Vault's shamir/shamir_test.go
(MPL-2.0; test data only, no code copied) and FIPS-197 section 4.2's products.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custodes.crypto import shamir
from custodes.crypto.shamir import _div, _inverse, _mul
from custodes.errors import KeyringError


def test_field_products_match_fips_197() -> None:
    assert _mul(0x57, 0x83) == 0xC1
    assert _mul(0x57, 0x13) == 0xFE
    assert _mul(0x57, 0x02) == 0xAE
    assert _mul(0x57, 0x04) == 0x47
    assert _mul(0x57, 0x08) == 0x8E
    assert _mul(0x57, 0x10) == 0x07


def test_field_matches_vaults_fixed_values() -> None:
    assert 16 ^ 16 == 0 and 3 ^ 4 == 7  # addition is xor
    assert _mul(3, 7) == 9
    assert _mul(3, 0) == 0 and _mul(0, 3) == 0
    assert _div(0, 7) == 0
    assert _div(3, 3) == 1
    assert _div(6, 3) == 2


def test_every_nonzero_element_has_an_inverse() -> None:
    for a in range(1, 256):
        assert _mul(a, _inverse(a)) == 1
    assert _inverse(0x53) == 0xCA  # FIPS-197 section 4.2's worked inverse


def test_vaults_split_and_combine_cases() -> None:
    secret = b"test"
    out = shamir.split(secret, 5, 3)
    assert len(out) == 5 and all(len(share) == len(secret) + 1 for share in out)
    for chosen in itertools.permutations(out, 3):
        assert shamir.combine(list(chosen)) == secret


@pytest.mark.parametrize(
    ("secret", "parts", "threshold"),
    [(b"test", 0, 0), (b"test", 2, 3), (b"test", 1000, 3), (b"test", 10, 1), (b"", 3, 2)],
)
def test_split_refuses_bad_settings(secret: bytes, parts: int, threshold: int) -> None:
    with pytest.raises(KeyringError):
        shamir.split(secret, parts, threshold)


@pytest.mark.parametrize(
    "shares",
    [[], [b"foo", b"ba"], [b"f", b"b"], [b"foo", b"foo"], [b"ab\x00", b"cd\x01"]],
)
def test_combine_refuses_malformed_or_repeated_shares(shares: list[bytes]) -> None:
    with pytest.raises(KeyringError):
        shamir.combine(shares)


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=40),
    sizes=st.integers(min_value=2, max_value=8).flatmap(
        lambda m: st.tuples(st.just(m), st.integers(min_value=m, max_value=10))
    ),
    data=st.data(),
)
def test_any_threshold_of_the_shares_rebuild_the_secret(
    secret: bytes, sizes: tuple[int, int], data: st.DataObject
) -> None:
    threshold, parts = sizes
    shares = shamir.split(secret, parts, threshold)
    count = data.draw(st.integers(threshold, parts))
    chosen = list(data.draw(st.permutations(shares)))[:count]
    assert shamir.combine(chosen) == secret


@settings(max_examples=40, deadline=None)
@given(
    threshold=st.integers(min_value=3, max_value=6),
    data=st.data(),
)
def test_one_share_short_of_the_threshold_gives_the_wrong_secret(
    threshold: int, data: st.DataObject
) -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold + 2, threshold)
    chosen = data.draw(st.permutations(shares))[: threshold - 1]
    assert shamir.combine(list(chosen)) != secret


def test_fewer_shares_than_the_threshold_fit_every_candidate_secret() -> None:
    # With M-1 shares fixed, for each candidate first byte there is a polynomial of
    # degree M-1 through those shares and that byte at x=0: the shares rule nothing out.
    known = shamir.split(b"\x2a", 5, 3)[:2]
    reached = {shamir.combine([*known, bytes([y, 9])])[0] for y in range(256)}
    assert reached == set(range(256))
