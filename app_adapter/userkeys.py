"""The user-held wrapping of a DEK (the memo's PBKDF2 + Fernet path), and key ids.

A user's DEK is stored twice: wrapped by KMS (``kms_encrypted_dek``, for
recovery; see :mod:`app_adapter.kms`) and sealed with a *user key*
(``user_encrypted_dek``). The user key is derived with PBKDF2 from a secret
the user holds -- in the memo's plan, material from a client certificate --
and a per-user ``salt``. It is worth something only if that secret is not in
the database: deriving it from the user id, or storing ``user_key`` next to
the sealed DEK (``OWUI_CRYPTO_STORE_USER_KEY``, legacy only), lets anyone
who reads the table open the DEK.

:func:`fingerprint` and :func:`key_id` name a key without disclosing it. The
SQL side computes the same two values; their definitions are fixed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from app_adapter.errors import CannotUnwrap, InvalidInput
from app_adapter.secret import SecretBytes

__all__ = [
    "DEFAULT_ITERATIONS",
    "FINGERPRINT_MESSAGE",
    "derive_user_key",
    "fingerprint",
    "key_id",
    "new_salt",
    "open_dek_for_user",
    "seal_dek_for_user",
]

#: OWASP's 2023 figure for PBKDF2-HMAC-SHA256.
DEFAULT_ITERATIONS = 600_000

#: The message HMACed by :func:`fingerprint`. Changing it renames every key.
FINGERPRINT_MESSAGE = b"owui-crypto key fingerprint v1"

_SALT_MIN_BYTES = 16  # NIST SP 800-132: at least 128 bits
_ITERATIONS_MIN = 1_000  # NIST SP 800-132's floor; keep the default in practice
_DEK_BYTES = 32


def new_salt() -> bytes:
    """16 random bytes for a user's ``salt`` column."""
    return os.urandom(_SALT_MIN_BYTES)


def derive_user_key(user_secret: bytes, salt: bytes, iterations: int = DEFAULT_ITERATIONS) -> bytes:
    """PBKDF2-HMAC-SHA256 of ``user_secret`` into a Fernet key.

    Returns the 32 derived bytes encoded as urlsafe base64 (44 bytes), the
    form :class:`cryptography.fernet.Fernet` takes.
    """
    if not isinstance(user_secret, (bytes, bytearray)) or not user_secret:
        raise InvalidInput("user_secret must be non-empty bytes")
    if not isinstance(salt, (bytes, bytearray)) or len(salt) < _SALT_MIN_BYTES:
        raise InvalidInput(f"salt must be at least {_SALT_MIN_BYTES} bytes")
    if not isinstance(iterations, int) or iterations < _ITERATIONS_MIN:
        raise InvalidInput(f"iterations must be an int >= {_ITERATIONS_MIN}, got {iterations!r}")
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=bytes(salt), iterations=iterations)
    return base64.urlsafe_b64encode(kdf.derive(bytes(user_secret)))


def seal_dek_for_user(dek: SecretBytes | bytes, user_key: bytes) -> bytes:
    """Seal a 32-byte DEK with a user key from :func:`derive_user_key` (a Fernet token)."""
    plaintext = dek.reveal() if isinstance(dek, SecretBytes) else dek
    if not isinstance(plaintext, (bytes, bytearray)) or len(plaintext) != _DEK_BYTES:
        raise InvalidInput(f"a DEK is {_DEK_BYTES} bytes")
    return _fernet(user_key).encrypt(bytes(plaintext))


def open_dek_for_user(token: bytes, user_key: bytes) -> SecretBytes:
    """Open a token from :func:`seal_dek_for_user`; :class:`CannotUnwrap` if it does not open."""
    fernet = _fernet(user_key)
    try:
        plaintext = fernet.decrypt(token)
    except (InvalidToken, TypeError, ValueError):
        # Wrong key and tampered token look the same to Fernet, and should.
        raise CannotUnwrap("the sealed DEK does not open with this user key") from None
    if len(plaintext) != _DEK_BYTES:
        raise CannotUnwrap(f"the sealed value is {len(plaintext)} bytes, not a {_DEK_BYTES}-byte DEK")
    return SecretBytes(plaintext)


def fingerprint(key: SecretBytes | bytes) -> bytes:
    """HMAC-SHA256(key=key, msg=b"owui-crypto key fingerprint v1"), 32 bytes.

    Identifies a key without revealing it: computing it needs the key.
    """
    material = key.reveal() if isinstance(key, SecretBytes) else key
    if not isinstance(material, (bytes, bytearray)):
        raise InvalidInput(f"a key is bytes, got {type(material).__name__}")
    return hmac.new(bytes(material), FINGERPRINT_MESSAGE, hashlib.sha256).digest()


def key_id(key: SecretBytes | bytes) -> str:
    """The first 8 bytes of :func:`fingerprint` as 16 lowercase hex digits."""
    return fingerprint(key)[:8].hex()


def _fernet(user_key: bytes) -> Fernet:
    try:
        return Fernet(user_key)
    except (TypeError, ValueError):
        # cryptography's message does not quote the key, but be explicit.
        raise InvalidInput("user_key must be 32 urlsafe-base64-encoded bytes (from derive_user_key)") from None
