"""Handing keys to PostgreSQL without showing them to its logs, or to other clients.

``owui_crypto.activate()`` (``sql/80_hardening.sql``) takes keys only as Fernet
tokens under a *transport entry*: a key that a server backend made for this
client alone and gave out once, as a query result (which no PostgreSQL log
records). The backend keeps its entries where the application's role can
neither read nor set them, so neither a log reader nor another client behind
the same pooler can open a token, and no client can choose the key.

Every token carries a counter (8 bytes, big-endian, before the key). The
backend accepts a counter only above the last one it accepted for that entry
and records it outside the transaction, so a token copied from a log that
records bind parameters is spent: replayed on that backend it is refused
(OC004), on any other it names no entry there and activates nothing.

:class:`Transport` is the client side for one client connection. It remembers
the entries of the last few backends it met: behind a transaction pooler
(PgBouncer) a client connection hops between server backends, so it offers
its keys wrapped under each, and the backend picks its own -- still one round
trip. When it lands on a backend it has not met, ``activate()`` answers with a
new entry and the client tries again inside the same transaction.
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
    """The backend kept refusing our transport entry (it should accept the one it just gave)."""


@dataclass
class _Entry:
    fernet: Fernet = field(repr=False)
    counter: int = 0


@dataclass
class Transport:
    """Transport state of one client connection: its entries on the backends it met."""

    known: OrderedDict[str, _Entry] = field(default_factory=OrderedDict, repr=False)
    round_trips: int = 0  # activate() calls, for the benchmarks
    renewals: int = 0  # backends met for the first time

    def establish(self, cursor: Any) -> None:
        """Get an entry from the backend ahead of the first transaction (activating nothing)."""
        cursor.execute(ACTIVATE, (None, [], [], []))
        self._learn(cursor.fetchone()[0])

    def _learn(self, fresh: str) -> None:
        entry_id, key = fresh.split(":", 1)
        self.known[entry_id] = _Entry(Fernet(key.encode("ascii")))
        self.known.move_to_end(entry_id, last=False)
        while len(self.known) > KNOWN_BACKENDS:
            self.known.popitem()

    def _offers(self, user_key: bytes | None, share_key: bytes | None) -> tuple[list[str | None], list[str | None]]:
        """One fresh counter per entry, shared by the user and share tokens of this activation."""
        users: list[str | None] = []
        shares: list[str | None] = []
        for entry in self.known.values():
            entry.counter += 1
            prefix = entry.counter.to_bytes(8, "big")
            users.append(None if user_key is None else entry.fernet.encrypt(prefix + user_key).decode("ascii"))
            shares.append(None if share_key is None else entry.fernet.encrypt(prefix + share_key).decode("ascii"))
        return users, shares

    def activate(self, cursor: Any, user_id: str | None, user_key: bytes | None, share_key: bytes | None,
                 search_path: str | None = None) -> None:
        """Give the current transaction the keys of ``user_id`` and the share key.

        ``cursor`` is a DB-API cursor of psycopg 3 using server-side binding,
        so the statement text never contains the (wrapped) keys.
        """
        for _ in range(3):
            self.round_trips += 1
            users, shares = self._offers(user_key, share_key)
            params = (user_id, list(self.known), users, shares)
            if search_path is None:
                cursor.execute(ACTIVATE, params)
            else:
                cursor.execute(ACTIVATE_WITH_PATH, (*params, search_path))
            fresh = cursor.fetchone()[0]
            if fresh is None:
                return
            self.renewals += 1
            self._learn(fresh)
        raise TransportError("PostgreSQL did not accept the transport entry it handed out; is a pooler "
                             "switching server backends inside a transaction (session or statement pooling)?")
