"""A bytes holder that will not show its contents by accident.

:class:`SecretBytes` carries key material (a user's DEK, a deployment key)
through code that logs, formats exceptions or pickles objects. It does not
make the bytes unreadable -- Python cannot wipe or hide memory -- it only
makes *accidental* disclosure (``repr`` in a log line, a traceback with
``--showlocals``, a pickled cache entry) impossible without calling
:meth:`SecretBytes.reveal`, which is easy to find in review.
"""

from __future__ import annotations

import hmac
from typing import Any, NoReturn

__all__ = ["SecretBytes"]


class SecretBytes:
    """Immutable secret bytes with a redacted ``repr`` and ``str``.

    Equality with another :class:`SecretBytes` is constant-time
    (:func:`hmac.compare_digest`). Instances are unhashable, so a secret
    never becomes a dict key whose hash could be printed, and unpicklable,
    so it never leaves the process by serialisation.
    """

    __slots__ = ("_value",)

    _value: bytes

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            # Name only the type: the value may be a secret in the wrong form.
            raise TypeError(f"SecretBytes needs bytes, got {type(value).__name__}")
        object.__setattr__(self, "_value", bytes(value))

    def reveal(self) -> bytes:
        """Return the secret bytes. Every call site is a place to review."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"SecretBytes(<{len(self._value)} bytes redacted>)"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        # f"{secret:x}" would otherwise raise a TypeError naming nothing
        # useful; format it as the redacted repr whatever the spec.
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretBytes):
            return hmac.compare_digest(self._value, other._value)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, SecretBytes):
            return not hmac.compare_digest(self._value, other._value)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("SecretBytes is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("SecretBytes is immutable")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        # Every pickle protocol ends up here; refusing it keeps secrets out
        # of caches, queues and multiprocessing payloads.
        raise TypeError("SecretBytes cannot be pickled")

    # copy would otherwise fall back to __reduce_ex__; an immutable value
    # can simply be shared.
    def __copy__(self) -> SecretBytes:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SecretBytes:
        return self
