"""Shamir secret sharing over GF(2^8), the AES field (x^8 + x^4 + x^3 + x + 1).

A share is the y-bytes followed by one byte, its x coordinate (1..255), the layout
HashiCorp Vault uses. Any `threshold` shares give the secret back; fewer say nothing.
"""

from __future__ import annotations

import secrets

from custodes.errors import KeyringError

__all__ = ["MAX_PARTS", "MIN_THRESHOLD", "combine", "split"]

MAX_PARTS = 255
MIN_THRESHOLD = 2


def _mul(a: int, b: int) -> int:
    # Shift-and-add with masks instead of branches or log tables: no secret-dependent
    # branch or table index (Python itself promises no constant time; this is the cheap part).
    product = 0
    for _ in range(8):
        product ^= -(b & 1) & a
        carry = -((a >> 7) & 1) & 0x1B
        a = ((a << 1) & 0xFF) ^ carry
        b >>= 1
    return product


def _inverse(a: int) -> int:
    # a^254 = a^-1 in GF(2^8); 0 maps to 0, callers never divide by it.
    result, base, exponent = 1, a, 254
    while exponent:
        if exponent & 1:
            result = _mul(result, base)
        base = _mul(base, base)
        exponent >>= 1
    return result


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    return _mul(a, _inverse(b))


def split(secret: bytes, parts: int, threshold: int) -> list[bytes]:
    """Split `secret` into `parts` shares, any `threshold` of which rebuild it."""
    if not isinstance(secret, bytes) or not secret:
        raise KeyringError("cannot split an empty secret")
    if isinstance(parts, bool) or isinstance(threshold, bool):
        raise KeyringError("parts and threshold must be integers")
    if threshold < MIN_THRESHOLD:
        raise KeyringError(f"threshold must be at least {MIN_THRESHOLD}")
    if parts < threshold:
        raise KeyringError("parts cannot be fewer than the threshold")
    if parts > MAX_PARTS:
        raise KeyringError(f"parts cannot exceed {MAX_PARTS}")
    xs = list(range(1, parts + 1))
    ys = [bytearray(len(secret)) for _ in xs]
    for position, byte in enumerate(secret):
        coefficients = [byte] + [secrets.randbelow(256) for _ in range(threshold - 1)]
        for share, x in zip(ys, xs, strict=True):
            value = 0
            for coefficient in reversed(coefficients):  # Horner
                value = _mul(value, x) ^ coefficient
            share[position] = value
    return [bytes(y) + bytes([x]) for y, x in zip(ys, xs, strict=True)]


def combine(shares: list[bytes]) -> bytes:
    """Rebuild a secret from shares. Too few shares give a wrong secret, not an error."""
    if len(shares) < MIN_THRESHOLD:
        raise KeyringError(f"at least {MIN_THRESHOLD} shares are needed")
    if any(not isinstance(share, bytes) for share in shares):
        raise KeyringError("shares must be bytes")
    length = len(shares[0])
    if length < 2:
        raise KeyringError("shares are too short")
    if any(len(share) != length for share in shares):
        raise KeyringError("shares have different lengths")
    xs = [share[-1] for share in shares]
    if len(set(xs)) != len(xs):
        raise KeyringError("the same share was given twice")
    if 0 in xs:
        raise KeyringError("malformed share")
    secret = bytearray(length - 1)
    for position in range(length - 1):
        value = 0
        for i, (share, xi) in enumerate(zip(shares, xs, strict=True)):
            # Lagrange basis at 0: prod x_j / (x_j - x_i); subtraction is xor.
            basis = 1
            for j, xj in enumerate(xs):
                if i != j:
                    basis = _mul(basis, _div(xj, xj ^ xi))
            value ^= _mul(share[position], basis)
        secret[position] = value
    return bytes(secret)
