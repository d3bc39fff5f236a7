"""Handing keys to PostgreSQL without showing them to its logs.

``owui_crypto.activate()`` (``sql/20_keys.sql``) takes keys only as Fernet
tokens under a per-backend *transport key* that the backend made itself and
gave out only as a query result. :class:`Transport` is the client side of that
exchange for one client connection: it remembers the transport key of the
backend it last talked to and, when a pooler has moved it to another backend,
takes the fresh key that ``activate()`` answers with and tries again in the
same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet

ACTIVATE = "SELECT owui_crypto.activate(%s, %s, %s, %s)"


class TransportError(RuntimeError):
    """The backend kept refusing our transport key (it should accept the one it just gave)."""


@dataclass
class Transport:
    """Transport-key state of one client connection."""

    key_id: str = ""
    _fernet: Fernet | None = field(default=None, repr=False)
    round_trips: int = 0  # total activate() calls, for the benchmarks
    renewals: int = 0  # how often the backend handed us a new transport key

    def _wrap(self, key: bytes | None) -> str | None:
        if key is None or self._fernet is None:
            return None
        return self._fernet.encrypt(key).decode("ascii")

    def activate(self, cursor: Any, user_id: str | None, user_key: bytes | None, share_key: bytes | None) -> None:
        """Give the current transaction the keys of ``user_id`` and the share key.

        ``cursor`` is a psycopg 3 cursor using server-side binding, so the
        statement text never contains the (wrapped) keys.
        """
        for _ in range(3):
            self.round_trips += 1
            cursor.execute(ACTIVATE, (user_id, self.key_id, self._wrap(user_key), self._wrap(share_key)))
            (fresh,) = cursor.fetchone()
            if fresh is None:
                return
            self.renewals += 1
            self.key_id, key = fresh.split(":", 1)
            self._fernet = Fernet(key.encode("ascii"))
        raise TransportError("PostgreSQL did not accept the transport key it handed out; is a pooler "
                             "switching server backends inside a transaction (session or statement pooling)?")
