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
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from cryptography.fernet import Fernet
from psycopg import generators, pq
from psycopg.errors import error_from_result
from sqlalchemy.util import await_only

from app_adapter.errors import OwuiCryptoError

ACTIVATE = "SELECT owui_crypto.activate(%s, %s, %s, %s)"
# The same, also putting the decrypting views first for this transaction only
# (a session-level SET would leak to other clients behind a pooler).
ACTIVATE_WITH_PATH = "SELECT owui_crypto.activate(%s, %s, %s, %s), pg_catalog.set_config('search_path', %s, true)"

#: Backends remembered per client connection: a pooler's pool for one
#: database is typically this small, and each one costs two Fernet wraps per
#: transaction.
KNOWN_BACKENDS = 4


#: Runs one statement with bind parameters and returns the first column of its one row.
Trip = Callable[[str, Sequence[Any]], Any]

_TEXT, _TEXT_ARRAY = 25, 1009  # type oids of activate()'s parameters
#: The same statements with libpq's placeholders, for :func:`with_begin`.
_NUMBERED = {ACTIVATE: (b"SELECT owui_crypto.activate($1, $2, $3, $4)", (_TEXT, _TEXT_ARRAY, _TEXT_ARRAY, _TEXT_ARRAY)),
             ACTIVATE_WITH_PATH: (b"SELECT owui_crypto.activate($1, $2, $3, $4), "
                                  b"pg_catalog.set_config('search_path', $5, true)",
                                  (_TEXT, _TEXT_ARRAY, _TEXT_ARRAY, _TEXT_ARRAY, _TEXT))}
_PIPELINES = pq.version() >= 140000 and psycopg.Pipeline.is_supported()


def _text(value: Any, encoding: str) -> bytes | None:
    """activate()'s parameters in PostgreSQL's text format: text, or arrays of text (elements quoted)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode(encoding)
    items = ("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in value)
    return ("{" + ",".join(items) + "}").encode(encoding)


def _flight(pgconn: Any, begin: bytes, sql: bytes, params: list[bytes | None],
            types: Sequence[int]) -> Generator[Any, Any, list[Any]]:
    """BEGIN, the statement and a Sync, sent at once in pipeline mode; every result up to the Sync.
    A psycopg generator (for ``Connection.wait``): it waits without blocking an event loop."""
    pgconn.enter_pipeline_mode()
    results: list[Any] = []
    try:
        pgconn.send_query_params(begin, None)
        pgconn.send_query_params(sql, params, param_types=types)
        pgconn.pipeline_sync()
        yield from generators.send(pgconn)
        for _ in range(8):  # BEGIN's, the statement's, the Sync: three sets
            got = yield from generators.fetch_many(pgconn)
            results.extend(got)
            if got and got[-1].status == pq.ExecStatus.PIPELINE_SYNC:
                break
    finally:
        try:
            pgconn.exit_pipeline_mode()
        except psycopg.OperationalError:
            pgconn.finish()  # results left unread: fail closed, the pool drops the connection
    return results


def with_begin(driver: Any) -> Trip | None:
    """A trip that sends the transaction's BEGIN with activate() in one flight, or None when the transaction
    has begun already (or the connection runs in autocommit, or libpq has no pipeline mode).

    psycopg sends BEGIN by itself before a transaction's first statement and waits for its answer (in
    pipeline mode too): activate() as a transaction's first statement cost two round trips where Open
    WebUI's own first statement costs one plus the same BEGIN. Here BEGIN -- the text psycopg would send,
    so isolation level, read-only and deferrable are kept -- and activate() leave in one libpq pipeline,
    parameters bound (extended protocol), and both answers are read before anything else is sent: a
    refusal raises as it would without the pipeline, a fresh transport entry is retried on the cursor.
    (psycopg's own pipeline object costs more client time than the round trip it saves.)"""
    pgconn = getattr(driver, "pgconn", None)
    if (not _PIPELINES or pgconn is None or driver.autocommit
            or pgconn.transaction_status != pq.TransactionStatus.IDLE
            or pgconn.pipeline_status != pq.PipelineStatus.OFF or not hasattr(driver, "_get_tx_start_command")):
        return None
    begin = driver._get_tx_start_command()
    encoding = driver.info.encoding

    def trip(sql: str, params: Sequence[Any]) -> Any:
        numbered, types = _NUMBERED[sql]
        flight = _flight(pgconn, begin, numbered, [_text(p, encoding) for p in params], types)
        try:
            results = await_only(driver.wait(flight)) if isinstance(driver, psycopg.AsyncConnection) \
                else driver.wait(flight)
        except BaseException:
            flight.close()  # interrupted: leave pipeline mode now, or drop the connection (see _flight)
            raise
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise error_from_result(result, encoding=encoding)
        answers = [r for r in results if r.status == pq.ExecStatus.TUPLES_OK]
        if len(answers) != 1 or answers[0].ntuples != 1:
            raise psycopg.OperationalError("activate() sent with BEGIN got no answer")
        value = answers[0].get_value(0, 0)
        return None if value is None else bytes(value).decode(encoding)

    return trip


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
                 search_path: str | None = None, *, first_trip: Trip | None = None) -> None:
        """Give the current transaction the keys of ``user_id`` and the share key.

        ``cursor`` is a DB-API cursor of psycopg 3 using server-side binding,
        so the statement text never contains the (wrapped) keys.
        ``first_trip``, if given, sends the first attempt instead of ``cursor``
        (the hook sends it together with the transaction's BEGIN); the
        attempts after a renewal use ``cursor``.
        """
        for attempt in range(3):
            self.round_trips += 1
            users, shares = self._offers(user_key, share_key)
            params: tuple[Any, ...] = (user_id, list(self.known), users, shares)
            sql = ACTIVATE
            if search_path is not None:
                sql, params = ACTIVATE_WITH_PATH, (*params, search_path)
            if attempt == 0 and first_trip is not None:
                fresh = first_trip(sql, params)
            else:
                cursor.execute(sql, params)
                fresh = cursor.fetchone()[0]
            if fresh is None:
                return
            self.renewals += 1
            self._learn(fresh)
        raise TransportError("PostgreSQL did not accept the transport entry it handed out; is a pooler "
                             "switching server backends inside a transaction (session or statement pooling)?")
