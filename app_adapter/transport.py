"""Handing keys to PostgreSQL without showing them to its logs.

``owui_crypto.activate()`` (``sql/20_keys.sql``) takes keys only as Fernet
tokens under a per-backend *transport key* that the backend made itself and
gave out only as a query result. :class:`Transport` is the client side of that
exchange for one client connection. It remembers the transport keys of the
last few backends it met: behind a transaction pooler (PgBouncer) a client
connection hops between server backends, so it offers its keys wrapped under
each, and the backend picks its own -- still one round trip. When it lands on
a backend it has not met, ``activate()`` answers with that backend's key and
the client tries again inside the same transaction.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet

from app_adapter.errors import OwuiCryptoError

ACTIVATE = "SELECT owui_crypto.activate(%s, %s, %s, %s)"
# The same, also putting the decrypting views first for this transaction only
# (a session-level SET would leak to other clients behind a pooler).
ACTIVATE_WITH_PATH = "SELECT owui_crypto.activate(%s, %s, %s, %s), pg_catalog.set_config('search_path', %s, true)"

#: Backends remembered per client connection: a pooler's pool for one
#: database is typically this small, and each one costs two Fernet wraps per
#: transaction.
KNOWN_BACKENDS = 4


class TransportError(OwuiCryptoError):
    """The backend kept refusing our transport key (it should accept the one it just gave)."""


@dataclass
class Transport:
    """Transport-key state of one client connection."""

    known: OrderedDict[str, Fernet] = field(default_factory=OrderedDict, repr=False)
    round_trips: int = 0  # activate() calls, for the benchmarks
    renewals: int = 0  # backends met for the first time

    def establish(self, cursor: Any) -> None:
        """Learn the backend's transport key ahead of the first transaction."""
        cursor.execute("SELECT owui_crypto.transport_key()")
        self._learn(cursor.fetchone()[0])

    def _learn(self, fresh: str) -> None:
        key_id, key = fresh.split(":", 1)
        self.known[key_id] = Fernet(key.encode("ascii"))
        self.known.move_to_end(key_id, last=False)
        while len(self.known) > KNOWN_BACKENDS:
            self.known.popitem()

    def _offers(self, key: bytes | None) -> list[str | None]:
        return [None if key is None else f.encrypt(key).decode("ascii") for f in self.known.values()]

    def activate(self, cursor: Any, user_id: str | None, user_key: bytes | None, share_key: bytes | None,
                 search_path: str | None = None) -> None:
        """Give the current transaction the keys of ``user_id`` and the share key.

        ``cursor`` is a DB-API cursor of psycopg 3 using server-side binding,
        so the statement text never contains the (wrapped) keys.
        """
        for _ in range(3):
            self.round_trips += 1
            params = (user_id, list(self.known), self._offers(user_key), self._offers(share_key))
            if search_path is None:
                cursor.execute(ACTIVATE, params)
            else:
                cursor.execute(ACTIVATE_WITH_PATH, (*params, search_path))
            fresh = cursor.fetchone()[0]
            if fresh is None:
                return
            self.renewals += 1
            self._learn(fresh)
        raise TransportError("PostgreSQL did not accept the transport key it handed out; is a pooler "
                             "switching server backends inside a transaction (session or statement pooling)?")
