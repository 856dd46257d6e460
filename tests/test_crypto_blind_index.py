"""Blind-index tokens and record ids: keyed, truncated, deterministic, and pinned."""

from __future__ import annotations

import base64
import hmac
import re

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from custodes.crypto import BlindIndexer, KeyMaterial, plan_token_bits
from custodes.crypto.blind_index import _HmacSha256, base32_lower
from custodes.errors import ConfigurationError

VAULT = bytes(range(16))
ROOT = bytes(range(96, 128))
MATERIAL = KeyMaterial(vault_id=VAULT, kek_version=1, keks={1: bytes(32)}, index_root=ROOT)
OTHER_KEYS = MATERIAL._replace(index_root=bytes(range(128, 160)))
OTHER_VAULT = MATERIAL._replace(vault_id=bytes(16))

ID_INDEX = 0x1234_5678
NAME_INDEX = 0x0000_0042
PLAN = {ID_INDEX: 27, NAME_INDEX: 27, 1: 8, 2: 63}

# Synthetic people only.
NATIONAL_ID = "110101199003078515"

parts_lists = st.lists(st.text(max_size=12), min_size=1, max_size=4)


@pytest.fixture
def indexer() -> BlindIndexer:
    return BlindIndexer(MATERIAL, PLAN)


# --- planning the token length ---------------------------------------------------------


def test_token_length_for_a_billion_people_is_27_bits() -> None:
    assert plan_token_bits(10**9) == 27
    assert plan_token_bits() == 27


@pytest.mark.parametrize(
    ("population", "bucket", "bits"),
    [
        (1, 4, 8),
        (1000, 4, 8),
        (4 * 2**8, 4, 8),
        (4 * 2**9 - 1, 4, 8),
        (4 * 2**9, 4, 9),
        (1_400_000_000, 4, 28),
        (10**9, 1, 29),
        (10**9, 64, 23),
        (2**70, 4, 63),
    ],
)
def test_token_length_plan(population: int, bucket: int, bits: int) -> None:
    assert plan_token_bits(population, bucket) == bits


@given(population=st.integers(1, 2**80), bucket=st.integers(1, 1000))
def test_planned_tokens_are_shared_by_at_least_a_bucket_of_values(
    population: int, bucket: int
) -> None:
    bits = plan_token_bits(population, bucket)
    assert 8 <= bits <= 63
    if 8 < bits < 63:
        # Exact integers: float division rounds at these magnitudes.
        assert population >= bucket * 2**bits
        assert population < bucket * 2 ** (bits + 1)


def test_token_length_plan_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        plan_token_bits(0)
    with pytest.raises(ValueError, match="positive"):
        plan_token_bits(10, 0)


# --- tokens ----------------------------------------------------------------------------


@given(parts=parts_lists)
def test_token_is_deterministic_across_instances(parts: list[str]) -> None:
    assert BlindIndexer(MATERIAL, PLAN).token(ID_INDEX, parts) == BlindIndexer(
        MATERIAL, PLAN
    ).token(ID_INDEX, parts)


@settings(max_examples=200)
@given(parts=parts_lists, index_id=st.sampled_from(sorted(PLAN)))
def test_token_fits_its_planned_width(parts: list[str], index_id: int) -> None:
    token = BlindIndexer(MATERIAL, PLAN).token(index_id, parts)
    assert 0 <= token < 2 ** PLAN[index_id]
    assert token < 2**63


@given(parts=parts_lists, bits=st.integers(8, 63))
def test_truncation_keeps_the_leading_bits(parts: list[str], bits: int) -> None:
    full = BlindIndexer(MATERIAL, {ID_INDEX: 63}).token(ID_INDEX, parts)
    short = BlindIndexer(MATERIAL, {ID_INDEX: bits}).token(ID_INDEX, parts)
    assert short == full >> (63 - bits)


def test_same_value_in_different_indexes_gives_unrelated_tokens() -> None:
    indexer = BlindIndexer(MATERIAL, {ID_INDEX: 63, NAME_INDEX: 63})
    values = [f"{n:018d}" for n in range(50)]
    a = [indexer.token(ID_INDEX, [v]) for v in values]
    b = [indexer.token(NAME_INDEX, [v]) for v in values]
    assert not set(a) & set(b)


def test_stolen_tokens_cannot_be_matched_across_vaults() -> None:
    mine = BlindIndexer(MATERIAL, {ID_INDEX: 63})
    for other in (OTHER_KEYS, OTHER_VAULT):
        theirs = BlindIndexer(other, {ID_INDEX: 63})
        assert mine.token(ID_INDEX, [NATIONAL_ID]) != theirs.token(ID_INDEX, [NATIONAL_ID])


def test_parts_cannot_be_reshuffled_into_the_same_token() -> None:
    indexer = BlindIndexer(MATERIAL, {NAME_INDEX: 63})
    variants = [["ab", "c"], ["a", "bc"], ["abc"], ["abc", ""], ["", "abc"], ["a", "b", "c"]]
    tokens = {indexer.token(NAME_INDEX, v) for v in variants}
    assert len(tokens) == len(variants)


def test_token_known_answer_matches_the_documented_derivation(indexer: BlindIndexer) -> None:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=VAULT,
        info=b"custodes/blind-index/v1/" + ID_INDEX.to_bytes(4, "big"),
    ).derive(ROOT)
    value = NATIONAL_ID.encode()
    digest = hmac.digest(key, len(value).to_bytes(4, "big") + value, "sha256")
    expected = int.from_bytes(digest[:8], "big") >> (64 - 27)
    assert indexer.token(ID_INDEX, [NATIONAL_ID]) == expected
    assert indexer.token(ID_INDEX, [NATIONAL_ID]) == 118_958_341  # pinned


def test_unplanned_index_is_refused(indexer: BlindIndexer) -> None:
    with pytest.raises(ConfigurationError, match="no token plan for index 99"):
        indexer.token(99, ["x"])


@pytest.mark.parametrize("plan", [{1: 7}, {1: 64}, {-1: 27}, {2**32: 27}])
def test_impossible_token_plan_is_refused(plan: dict[int, int]) -> None:
    with pytest.raises(ConfigurationError):
        BlindIndexer(MATERIAL, plan)


@settings(max_examples=200)
@given(key=st.binary(max_size=64), message=st.binary(max_size=300))
def test_precomputed_hmac_equals_the_standard_library(key: bytes, message: bytes) -> None:
    assert _HmacSha256(key).digest(message) == hmac.digest(key, message, "sha256")


@settings(max_examples=200)
@given(parts=parts_lists, version=st.sampled_from([None, 1]))
def test_an_index_tokenizer_gives_the_tokens_of_token(
    parts: list[str], version: int | None
) -> None:
    indexer = BlindIndexer(MATERIAL, PLAN)
    for index_id in PLAN:
        assert indexer.tokenizer(index_id, version)(parts) == indexer.token(index_id, parts)


def test_repr_of_indexer_shows_no_key(indexer: BlindIndexer) -> None:
    assert ROOT.hex() not in repr(indexer)


# --- record ids ------------------------------------------------------------------------


def test_record_id_is_24_lower_case_base32_characters(indexer: BlindIndexer) -> None:
    record_id = indexer.record_id("person", [NATIONAL_ID])
    assert re.fullmatch(r"[a-z2-7]{24}", record_id)


def test_record_id_known_answer_matches_the_documented_derivation(
    indexer: BlindIndexer,
) -> None:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=VAULT, info=b"custodes/record-id/v1"
    ).derive(ROOT)
    message = b"".join(len(p).to_bytes(4, "big") + p for p in (b"person", NATIONAL_ID.encode()))
    expected = base64.b32encode(hmac.digest(key, message, "sha256")[:15]).decode().lower()
    assert indexer.record_id("person", [NATIONAL_ID]) == expected
    assert expected == "y5n2gcd3y6xh65su4iiric72"  # pinned


@settings(max_examples=300)
@given(data=st.integers(0, 12).flatmap(lambda n: st.binary(min_size=5 * n, max_size=5 * n)))
def test_table_base32_equals_the_standard_library(data: bytes) -> None:
    assert base32_lower(data) == base64.b32encode(data).decode("ascii").lower()


@settings(max_examples=300)
@given(data=st.binary(min_size=15, max_size=15))
def test_table_base32_of_a_record_ids_bytes_equals_the_standard_library(data: bytes) -> None:
    assert base32_lower(data) == base64.b32encode(data).decode("ascii").lower()


@given(data=st.binary(min_size=1, max_size=64).filter(lambda b: len(b) % 5))
def test_table_base32_refuses_what_would_need_padding(data: bytes) -> None:
    with pytest.raises(ValueError, match="multiple of 5"):
        base32_lower(data)


@given(key=st.lists(st.text(max_size=20), min_size=1, max_size=3))
def test_reingesting_a_source_record_gives_the_same_id(key: list[str]) -> None:
    assert BlindIndexer(MATERIAL, {}).record_id("person", key) == BlindIndexer(
        MATERIAL, {}
    ).record_id("person", key)


def test_record_id_depends_on_type_and_key(indexer: BlindIndexer) -> None:
    ids = {
        indexer.record_id("person", [NATIONAL_ID]),
        indexer.record_id("case", [NATIONAL_ID]),
        indexer.record_id("person", ["110101199003078523"]),
        indexer.record_id("person", [NATIONAL_ID, ""]),
    }
    assert len(ids) == 4


def test_record_id_reveals_nothing_without_the_keys(indexer: BlindIndexer) -> None:
    mine = indexer.record_id("person", [NATIONAL_ID])
    assert mine != BlindIndexer(OTHER_KEYS, {}).record_id("person", [NATIONAL_ID])
    assert mine != BlindIndexer(OTHER_VAULT, {}).record_id("person", [NATIONAL_ID])
    assert NATIONAL_ID not in mine
