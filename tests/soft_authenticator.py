"""A software WebAuthn authenticator for tests: an ES256 key per credential, "none"
attestation, user presence and verification flags, and a sign count it keeps (or that a
test sets, to play a cloned authenticator)."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP, UV, AT = 0x01, 0x04, 0x40


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SoftCredential:
    credential_id: bytes
    key: ec.EllipticCurvePrivateKey
    rp_id: str
    user_handle: bytes
    sign_count: int = 0

    def cose_public_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,  # kty: EC2
                3: -7,  # alg: ES256
                -1: 1,  # crv: P-256
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )


@dataclass
class SoftAuthenticator:
    counts: bool = True  # whether it keeps a sign count (synced passkeys report 0)
    user_verified: bool = True
    credentials: list[SoftCredential] = field(default_factory=list)

    def create(self, options_json: str, origin: str) -> str:
        """navigator.credentials.create: a registration response as JSON."""
        options = orjson.loads(options_json)
        rp_id = str(options["rp"]["id"])
        cred = SoftCredential(
            os.urandom(32),
            ec.generate_private_key(ec.SECP256R1()),
            rp_id,
            unb64url(options["user"]["id"]),
        )
        self.credentials.append(cred)
        flags = UP | AT | (UV if self.user_verified else 0)
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([flags])
            + struct.pack(">I", cred.sign_count)
            + bytes(16)  # AAGUID
            + struct.pack(">H", len(cred.credential_id))
            + cred.credential_id
            + cred.cose_public_key()
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        client_data = _client_data("webauthn.create", options["challenge"], origin)
        return orjson.dumps(
            {
                "id": b64url(cred.credential_id),
                "rawId": b64url(cred.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": b64url(client_data),
                    "attestationObject": b64url(attestation),
                    "transports": ["internal"],
                },
                "clientExtensionResults": {},
            }
        ).decode()

    def get(
        self,
        options_json: str,
        origin: str,
        *,
        credential: SoftCredential | None = None,
        sign_count: int | None = None,
    ) -> str:
        """navigator.credentials.get: an assertion as JSON, by the first (or the given)
        credential for the options' rp id."""
        options = orjson.loads(options_json)
        rp_id = str(options["rpId"])
        cred = credential or next(c for c in self.credentials if c.rp_id == rp_id)
        if sign_count is not None:
            cred.sign_count = sign_count
        elif self.counts:
            cred.sign_count += 1
        flags = UP | (UV if self.user_verified else 0)
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([flags])
            + struct.pack(">I", cred.sign_count)
        )
        client_data = _client_data("webauthn.get", options["challenge"], origin)
        signed = auth_data + hashlib.sha256(client_data).digest()
        signature = cred.key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return orjson.dumps(
            {
                "id": b64url(cred.credential_id),
                "rawId": b64url(cred.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": b64url(client_data),
                    "authenticatorData": b64url(auth_data),
                    "signature": b64url(signature),
                    "userHandle": b64url(cred.user_handle),
                },
                "clientExtensionResults": {},
            }
        ).decode()


def _client_data(kind: str, challenge: str, origin: str) -> bytes:
    doc: dict[str, Any] = {
        "type": kind,
        "challenge": challenge,
        "origin": origin,
        "crossOrigin": False,
    }
    return orjson.dumps(doc)
