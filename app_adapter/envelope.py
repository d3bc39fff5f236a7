"""The sealed-value envelope, in Python.

The same format as ``sql/30_seal.sql``::

    oc1:<key id>:<fernet token>

The Fernet key of a value is not the DEK itself but
``HMAC-SHA256(DEK, "owui-crypto value v1" || 0x1f || binding)``, where the
binding is ``"table.column/row id"``. The database seals and opens; this module
exists so that tests, tools and a disaster-recovery path can do the same
outside it, and so the two definitions are checked against each other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken

PREFIX = "oc1:"
_VALUE_LABEL = b"owui-crypto value v1\x1f"


class SealedValueError(Exception):
    """An envelope is malformed, or failed its integrity check under the given key."""


def binding(table: str, column: str, row_id: str) -> str:
    return f"{table}.{column}/{row_id}"


def value_key(master: bytes, bind: str) -> bytes:
    """The 32-byte Fernet key of one value: master key bound to table, column and row."""
    return hmac.new(master, _VALUE_LABEL + bind.encode("utf-8"), hashlib.sha256).digest()


def _fernet(master: bytes, bind: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(value_key(master, bind)))


def seal(master: bytes, key_id: str, bind: str, plaintext: str) -> str:
    token = _fernet(master, bind).encrypt(plaintext.encode("utf-8")).decode("ascii")
    return f"{PREFIX}{key_id}:{token}"


def key_id_of(envelope: str) -> str:
    if not envelope.startswith(PREFIX) or envelope[20:21] != ":":
        raise SealedValueError("not an owui-crypto envelope")
    return envelope[4:20]


def open_(master: bytes, bind: str, envelope: str) -> str:
    key_id_of(envelope)
    try:
        return _fernet(master, bind).decrypt(envelope[21:].encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError) as exc:
        raise SealedValueError(f"sealed value {bind} failed its integrity check") from exc
