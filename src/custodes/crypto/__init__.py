"""The vault's cryptography: keyring, envelope encryption of records, blind indexes.

The keyring holds the keys apart from the data; `RecordSealer` seals each record
under its own data key; `BlindIndexer` turns values into keyed, truncated tokens.
"""

from custodes.crypto.blind_index import BlindIndexer, plan_token_bits
from custodes.crypto.envelope import RecordSealer
from custodes.crypto.keyring import KdfParams, KeyMaterial, Keyring

__all__ = [
    "BlindIndexer",
    "KdfParams",
    "KeyMaterial",
    "Keyring",
    "RecordSealer",
    "plan_token_bits",
]
