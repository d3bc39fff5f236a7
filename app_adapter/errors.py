"""Exceptions raised by owui-crypto.

Every exception the package raises on purpose derives from
:class:`OwuiCryptoError`, so a caller can tell "our" failures from bugs.

Messages name what to check (an environment variable, a key id, a user id)
and never carry key material: no DEK, no unwrapped plaintext, no HMAC input
beyond its length. Where a lower layer failed, the original exception is kept
as ``__cause__`` unless its own text could echo a secret (see
:func:`app_adapter.kms.KmsKeys`), in which case it is dropped on purpose.
"""

from __future__ import annotations

__all__ = [
    "CannotUnwrap",
    "ConfigError",
    "DatabaseRefusal",
    "IntegrityFailure",
    "InvalidInput",
    "KeyUnavailable",
    "KmsError",
    "KmsThrottled",
    "KmsUnreachable",
    "MacAlgorithmMismatch",
    "NoKeyActive",
    "NotOwner",
    "NotProvisioned",
    "OwnerChange",
    "OwuiCryptoError",
    "SealedDataRemains",
    "TransportRefused",
    "UnsupportedDriver",
    "WrongKey",
    "from_database",
]


class OwuiCryptoError(Exception):
    """Base class of every error raised by owui-crypto."""

    #: True when the same call may succeed if simply tried again later.
    retryable: bool = False


class ConfigError(OwuiCryptoError):
    """A setting is missing or malformed.

    The message names the environment variable and shows a valid value.
    """


class InvalidInput(OwuiCryptoError, ValueError):
    """An argument was refused before any key service was called."""


class MacAlgorithmMismatch(InvalidInput):
    """An explicit MAC algorithm does not match the HMAC key's KeySpec.

    A KMS HMAC key supports exactly one algorithm; asking for another one is
    refused by real KMS (and silently accepted by emulators), so we refuse
    it ourselves before calling.
    """


class CannotUnwrap(OwuiCryptoError):
    """A wrapped key could not be opened.

    The blob is corrupt, was made under another key, or belongs to another
    user or name (its encryption context differs). Retrying will not help.
    """


class KmsError(OwuiCryptoError):
    """KMS refused or failed a call for a reason not covered by a subclass."""


class KeyUnavailable(KmsError):
    """A configured KMS key cannot be used.

    Disabled, pending deletion, missing, of the wrong usage or spec, or not
    usable with the current credentials. Needs an operator, not a retry.
    """


class KmsThrottled(KmsError):
    """KMS rejected the call for exceeding a request quota."""

    retryable = True


class KmsUnreachable(KmsError):
    """KMS could not be reached or did not answer in time."""

    retryable = True


class NotProvisioned(OwuiCryptoError):
    """A user has no key yet (or any more: it was shredded)."""


class UnsupportedDriver(OwuiCryptoError):
    """The engine's driver would put keys into SQL text (psycopg2, client-side binding)."""


# -- failures reported by PostgreSQL, by SQLSTATE (sql/*.sql) ---------------


class DatabaseRefusal(OwuiCryptoError):
    """owui-crypto's SQL refused an operation; ``sqlstate`` says which rule."""

    sqlstate = ""


class NoKeyActive(DatabaseRefusal):
    """OC001: sealed content was written with no key active for it."""

    sqlstate = "OC001"


class NotOwner(DatabaseRefusal):
    """OC002: the active user does not own the row whose content was written."""

    sqlstate = "OC002"


class IntegrityFailure(DatabaseRefusal):
    """OC003: a sealed value failed its integrity check (tampered, moved, or corrupt)."""

    sqlstate = "OC003"


class TransportRefused(DatabaseRefusal):
    """OC004: a key sent to activate() did not unwrap under the backend's transport key."""

    sqlstate = "OC004"


class WrongKey(DatabaseRefusal):
    """OC005: the key offered is not the registered key of that user (or none is registered)."""

    sqlstate = "OC005"


class SealedDataRemains(DatabaseRefusal):
    """OC006: removing owui-crypto would strand sealed data."""

    sqlstate = "OC006"


class OwnerChange(DatabaseRefusal):
    """OC007: sealed content cannot move to another owner."""

    sqlstate = "OC007"


_BY_SQLSTATE = {cls.sqlstate: cls for cls in DatabaseRefusal.__subclasses__()}


def from_database(exc: BaseException) -> DatabaseRefusal | None:
    """The owui-crypto refusal behind a psycopg or SQLAlchemy error, if it is one."""
    inner = getattr(exc, "orig", exc)
    cls = _BY_SQLSTATE.get(getattr(inner, "sqlstate", None) or "")
    if cls is None:
        return None
    primary = getattr(getattr(inner, "diag", None), "message_primary", None) or str(inner)
    refusal = cls(primary)
    refusal.__cause__ = inner
    return refusal
