"""Passkeys (WebAuthn) as a second factor beside the TOTP code: the pure logic around
py_webauthn. No I/O here: the account book keeps the credentials, the vault spends each
challenge once in storage and alone decides a login.

A challenge is stateless: random bytes, an expiry and an HMAC under a key derived from
the vault's key material, binding the purpose (register or log in), the account name and
what the ceremony runs under (the session, or the login form's pre-session token). So
any server process of the vault can check a challenge another issued; that it is used
only once is the vault's job (`Vault._spend_challenge`).

Every refusal is one fixed sentence: no challenge, credential or origin in its text.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from custodes.crypto import KeyMaterial
from custodes.errors import AuthenticationFailed

REGISTER = "register"
LOGIN = "login"
CHALLENGE_TTL = 300.0  # seconds; storage keeps a spent mark twice as long
MAX_PASSKEYS = 10
MAX_LABEL = 64
MAX_CREDENTIAL_JSON = 16_384  # a response is a few hundred bytes to a few KiB
RP_NAME = "custodes"

_CHALLENGE_INFO = b"custodes passkey challenge v1"
_NONCE = 16
_MAC = 32
_EXPIRES = struct.Struct(">Q")


class PasskeyRefused(AuthenticationFailed):
    """A passkey response that does not verify, for whatever reason: one message."""

    def __init__(self, message: str = "the passkey was not accepted") -> None:
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Ceremony:
    """Where a ceremony runs, as the server is reached: the origin the browser reports
    (scheme://host[:port]) and the relying party id (the host name)."""

    origin: str
    rp_id: str


@dataclass(frozen=True, slots=True)
class Assertion:
    """A navigator.credentials.get response offered at login, with where it was made and
    the pre-session token of the login form its challenge was bound to."""

    credential_json: str
    ceremony: Ceremony
    binding: bytes

    def __repr__(self) -> str:
        return "Assertion(<hidden>)"


@dataclass(frozen=True, slots=True)
class NewPasskey:
    """A verified registration: what is stored (nothing secret)."""

    credential_id: bytes
    public_key: bytes
    sign_count: int

    def __repr__(self) -> str:
        return f"NewPasskey(ref={credential_ref(self.credential_id)!r})"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise PasskeyRefused() from None


def credential_ref(credential_id: bytes) -> str:
    """A short public name for a credential, for the access log and the page."""
    return hashlib.sha256(credential_id).hexdigest()[:16]


def check_label(label: str) -> str:
    label = " ".join(label.split())
    if not label:
        return "passkey"
    if len(label) > MAX_LABEL or not label.isprintable():
        raise PasskeyRefused(f"a passkey's label is at most {MAX_LABEL} printable characters")
    return label


class ChallengeMint:
    """Issues and checks challenges bound to purpose, account, binding and expiry."""

    def __init__(self, material: KeyMaterial, random: Callable[[int], bytes]) -> None:
        self._random = random
        self._key = HKDF(hashes.SHA256(), 32, salt=material.vault_id, info=_CHALLENGE_INFO).derive(
            material.index_root
        )

    def __repr__(self) -> str:
        return "ChallengeMint(<hidden>)"

    def _mac(self, purpose: str, username: str, binding: bytes, head: bytes) -> bytes:
        message = b"\x00".join(
            (purpose.encode(), username.casefold().encode(), hashlib.sha256(binding).digest())
        )
        return hmac.new(self._key, message + b"\x00" + head, hashlib.sha256).digest()

    def issue(self, purpose: str, username: str, binding: bytes, now: float) -> bytes:
        head = self._random(_NONCE) + _EXPIRES.pack(int(now + CHALLENGE_TTL))
        return head + self._mac(purpose, username, binding, head)

    def check(
        self, challenge: bytes, purpose: str, username: str, binding: bytes, now: float
    ) -> bytes:
        """The challenge's nonce if this server issued it for exactly this purpose,
        account and binding, and it has not expired; else PasskeyRefused."""
        if len(challenge) != _NONCE + _EXPIRES.size + _MAC:
            raise PasskeyRefused()
        head, mac = challenge[:-_MAC], challenge[-_MAC:]
        if not hmac.compare_digest(mac, self._mac(purpose, username, binding, head)):
            raise PasskeyRefused()
        (expires,) = _EXPIRES.unpack(head[_NONCE:])
        if now > expires:
            raise PasskeyRefused("the passkey request has expired: try again")
        return head[:_NONCE]


# -- registration ---------------------------------------------------------------------


def registration_options(
    ceremony: Ceremony,
    *,
    username: str,
    user_handle: bytes,
    challenge: bytes,
    existing: Sequence[bytes],
) -> str:
    """The options for navigator.credentials.create, as JSON: a discoverable credential
    (so that logging in needs no list of an account's credentials) with user
    verification required."""
    options = generate_registration_options(
        rp_id=ceremony.rp_id,
        rp_name=RP_NAME,
        user_name=username,
        user_id=user_handle,
        challenge=challenge,
        timeout=int(CHALLENGE_TTL * 1000) // 2,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[PublicKeyCredentialDescriptor(id=c) for c in existing],
    )
    return options_to_json(options)


def verify_registration(
    credential_json: str, *, challenge: bytes, ceremony: Ceremony
) -> NewPasskey:
    try:
        verified = verify_registration_response(
            credential=_checked_json(credential_json),
            expected_challenge=challenge,
            expected_rp_id=ceremony.rp_id,
            expected_origin=ceremony.origin,
            require_user_presence=True,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError, AttributeError, IndexError):
        # Whatever the parser tripped on, the answer is one refusal without its details.
        raise PasskeyRefused() from None
    return NewPasskey(
        bytes(verified.credential_id),
        bytes(verified.credential_public_key),
        int(verified.sign_count),
    )


# -- authentication -------------------------------------------------------------------


def login_options(ceremony: Ceremony, *, challenge: bytes) -> str:
    """The options for navigator.credentials.get, as JSON. allowCredentials is empty for
    every account, known or not, with passkeys or without: the answer says nothing about
    the account, and the browser offers the passkeys it holds for this site."""
    options = generate_authentication_options(
        rp_id=ceremony.rp_id,
        challenge=challenge,
        timeout=int(CHALLENGE_TTL * 1000) // 2,
        allow_credentials=[],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return options_to_json(options)


def challenge_of(credential_json: str) -> bytes:
    """The challenge a response claims to answer (checked by its MAC before any use)."""
    doc = _checked_json(credential_json)
    try:
        client_data = orjson.loads(unb64url(str(doc["response"]["clientDataJSON"])))
        return unb64url(str(client_data["challenge"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise PasskeyRefused() from None


def credential_id_of(credential_json: str) -> bytes:
    doc = _checked_json(credential_json)
    raw = doc.get("rawId", doc.get("id"))
    if not isinstance(raw, str):
        raise PasskeyRefused()
    return unb64url(raw)


def verify_assertion(
    credential_json: str,
    *,
    challenge: bytes,
    ceremony: Ceremony,
    public_key: bytes,
    sign_count: int,
) -> int:
    """Verify a navigator.credentials.get response; the authenticator's new sign count.

    A count that does not move forward, when the authenticator keeps one, is refused: a
    cloned authenticator, or a replayed response."""
    try:
        verified = verify_authentication_response(
            credential=_checked_json(credential_json),
            expected_challenge=challenge,
            expected_rp_id=ceremony.rp_id,
            expected_origin=ceremony.origin,
            credential_public_key=public_key,
            credential_current_sign_count=sign_count,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError, AttributeError, IndexError):
        # Whatever the parser tripped on, the answer is one refusal without its details.
        raise PasskeyRefused() from None
    new_count = int(verified.new_sign_count)
    if (new_count or sign_count) and new_count <= sign_count:
        raise PasskeyRefused()
    return new_count


def _checked_json(credential_json: str) -> dict[str, Any]:
    if not isinstance(credential_json, str) or len(credential_json) > MAX_CREDENTIAL_JSON:
        raise PasskeyRefused()
    try:
        doc = orjson.loads(credential_json)
    except orjson.JSONDecodeError:
        raise PasskeyRefused() from None
    if not isinstance(doc, dict) or not isinstance(doc.get("response"), dict):
        raise PasskeyRefused()
    return doc
