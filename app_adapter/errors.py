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
    "InvalidInput",
    "KeyUnavailable",
    "KmsError",
    "KmsThrottled",
    "KmsUnreachable",
    "MacAlgorithmMismatch",
    "OwuiCryptoError",
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
