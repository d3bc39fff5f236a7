"""Open WebUI's migrations with the decrypting views kept in place, so that several instances can upgrade one by one.

Every instance reads Open WebUI's tables by their plain names with ``search_path = owui_crypto_view, public``
(:class:`app_adapter.hook.Adapter`). Were a view missing for a moment, the name would fall through to the base table
and that instance would read ciphertext: dropping every view before Open WebUI's migrations
(``owui_crypto.detach()``, still there for an operator) does exactly that to every other running instance until the
views are back.

Open WebUI's ``migrations/env.py`` runs all pending migrations in ONE transaction: ``context.configure(connection=...)``
without ``transaction_per_migration``, and Alembic's PostgreSQL dialect has transactional DDL, so
``context.begin_transaction()`` is a real ``BEGIN`` ... ``COMMIT`` around the whole upgrade. :func:`views_kept`
installs, for the duration of that step only, a listener on SQLAlchemy's :class:`~sqlalchemy.engine.Engine` class
(class-level: env.py makes its own engine) that, on the migration's own connection and inside its transaction:

* right before a statement that alters, drops, creates or renames-into a protected table ``t``, drops just
  ``owui_crypto_view.t`` -- the view pins the columns it reads, so ``DROP COLUMN`` or ``ALTER ... TYPE`` would
  otherwise fail;
* right after it, rebuilds that view (``owui_crypto.generate(t)``, then ``owui_crypto.grant_runtime()``) in a
  savepoint. When that is not possible yet (the table was renamed away to be recreated), the table stays pending and
  is retried after each later DDL statement;
* before the transaction commits, requires every touched table to have a view matching it again
  (``owui_crypto.drift()``), and otherwise refuses the commit: the whole upgrade rolls back with a message naming the
  policy to update (a migration removed a protected column or table), rather than commit a schema whose view cannot
  be built.

Other instances therefore never see a missing view. Until the commit, PostgreSQL shows them the old view; a query
that reaches it meanwhile waits on the lock the dropped view holds, and after the commit looks the name up again and
finds the new view. They wait for at most the rest of the migration transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from app_adapter.errors import OwuiCryptoError

#: Key of this module's per-transaction state in ``Connection.info`` (the pooled DB-API connection's dict).
_STATE = "owui_crypto.views_kept"
_SAVEPOINT = "owui_crypto_views_kept"

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_QUALIFIED = rf"(?:{_IDENT}\s*\.\s*)?{_IDENT}"
_PARTS = re.compile(rf"(?:({_IDENT})\s*\.\s*)?({_IDENT})")
_IF = r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?"
# Every form Alembic (op.add_column, alter_column, drop_column, rename_table, drop_table, batch operations) and
# hand-written op.execute() DDL take on PostgreSQL. Searched anywhere in the text, quoted SQL in a DO block
# included: a needless view swap costs a lock, a missed one makes the DDL fail on the view's dependency.
_ALTER = re.compile(rf"\bALTER\s+TABLE\s+{_IF}(?:ONLY\s+)?({_QUALIFIED})", re.IGNORECASE)
_RENAME_INTO = re.compile(rf"\bALTER\s+TABLE\s+{_IF}(?:ONLY\s+)?{_QUALIFIED}\s+RENAME\s+TO\s+({_IDENT})",
                          re.IGNORECASE)
_DROP = re.compile(rf"\bDROP\s+TABLE\s+{_IF}({_QUALIFIED}(?:\s*,\s*{_QUALIFIED})*)", re.IGNORECASE)
_CREATE = re.compile(rf"\bCREATE\s+(?:UNLOGGED\s+)?TABLE\s+{_IF}({_QUALIFIED})", re.IGNORECASE)
_DDL = re.compile(r"\b(?:ALTER|DROP|CREATE)\s", re.IGNORECASE)


class RollingUpgradeRefused(OwuiCryptoError):
    """Open WebUI's migrations would have left a protected table without its decrypting view; nothing was committed."""


def _unquote(identifier: str) -> str:
    if identifier.startswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier.lower()  # PostgreSQL folds unquoted names to lower case


def tables_in(statement: str) -> set[str]:
    """Names of the tables in schema ``public`` (or unqualified: migrations run with a plain search_path) that
    ``statement`` alters, drops, creates or renames a table into."""
    if not _DDL.search(statement):
        return set()
    found: set[str] = set()
    for pattern in (_ALTER, _DROP, _CREATE, _RENAME_INTO):
        for match in pattern.finditer(statement):
            for schema, name in _PARTS.findall(match.group(1)):
                if not schema or _unquote(schema) == "public":
                    found.add(_unquote(name))
    return found


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _reason(error: Exception) -> str:
    """PostgreSQL's message and hint, without the statement (Open WebUI's, which may be long)."""
    diag = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None) or str(error).strip()
    hint = getattr(diag, "message_hint", None)
    return f"{primary} ({hint})" if hint else primary


@dataclass
class _Transaction:
    """What one migration transaction did to the views."""

    touched: set[str] = field(default_factory=set)  # tables whose view it dropped
    pending: dict[str, str] = field(default_factory=dict)  # table -> why its view could not be built yet


@dataclass
class ViewKeeper:
    """The listener :func:`views_kept` installs; ``rebuilt`` names the views rebuilt in committed transactions."""

    tables: frozenset[str]
    rebuilt: set[str] = field(default_factory=set)

    def install(self) -> None:
        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)
        event.listen(Engine, "commit", self._commit)
        event.listen(Engine, "rollback", self._rollback)

    def remove(self) -> None:
        for name, listener in (("before_cursor_execute", self._before), ("after_cursor_execute", self._after),
                               ("commit", self._commit), ("rollback", self._rollback)):
            if event.contains(Engine, name, listener):
                event.remove(Engine, name, listener)

    def _protected_in(self, statement: str) -> set[str]:
        return tables_in(statement) & self.tables

    # -- the listener ------------------------------------------------------------------------------------------

    def _before(self, conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        tables = set() if executemany else self._protected_in(statement)
        if not tables:
            return
        dbapi = _dbapi(conn)
        if getattr(dbapi, "autocommit", False):
            # Outside a transaction a swapped view would be missing, visibly, until it is rebuilt. With the views
            # detached by hand (the way out named below) there is nothing to keep: owui-crypto's refresh rebuilds.
            if present := [t for t in sorted(tables) if _rows(dbapi, "SELECT to_regclass(%s) IS NOT NULL",
                                                              (f"owui_crypto_view.{_quote(t)}",))[0][0]]:
                raise RollingUpgradeRefused(
                    f"an Open WebUI migration changes {', '.join(present)} outside a transaction, so the decrypting "
                    "view cannot be swapped unseen and other instances would read ciphertext meanwhile. Stop every "
                    "other instance, run `SELECT owui_crypto.detach()` as the database owner, and start this one "
                    "again (it rebuilds the views after migrating)")
            return
        state: _Transaction = conn.info.setdefault(_STATE, _Transaction())
        for table in sorted(tables):
            try:
                _run(dbapi, f"DROP VIEW IF EXISTS owui_crypto_view.{_quote(table)}")
            except Exception as exc:  # the DB-API's error: SQLAlchemy would blame Open WebUI's statement for it
                raise RollingUpgradeRefused(
                    f"could not drop the decrypting view of {table} before Open WebUI's migration changes the table: "
                    f"{_reason(exc)}. Nothing was committed") from exc
            state.touched.add(table)
            state.pending[table] = "its view was dropped for the migration and not rebuilt yet"

    def _after(self, conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        state: _Transaction | None = conn.info.get(_STATE)
        if state is None or not state.pending or executemany or not _DDL.search(statement):
            return
        dbapi = _dbapi(conn)
        for table in sorted(state.pending):
            failure = _rebuild(dbapi, table)
            if failure is None:
                del state.pending[table]
            else:  # perhaps renamed away to be recreated: tried again after the next DDL, and at the commit
                state.pending[table] = failure

    def _commit(self, conn: Connection) -> None:
        state: _Transaction | None = conn.info.pop(_STATE, None)
        if state is None or not state.touched:
            return
        dbapi = _dbapi(conn)
        # A savepoint the migration rolled back may have undone a rebuild (or a drop): trust drift(), not the log.
        drifted = {row[0] for row in _rows(dbapi, "SELECT DISTINCT table_name::text FROM owui_crypto.drift() "
                                                  "WHERE table_name::text = ANY(%s)", (sorted(state.touched),))}
        for table in sorted(drifted | set(state.pending)):
            failure = _rebuild(dbapi, table)
            if failure is None:
                state.pending.pop(table, None)
            else:
                state.pending[table] = failure
        if state.pending:
            # Raised before the DB-API commit: SQLAlchemy and Alembic roll the whole upgrade back.
            raise RollingUpgradeRefused(
                "Open WebUI's migrations were rolled back, nothing changed: afterwards owui-crypto could not build the "
                "decrypting view of " + "; ".join(f"{t} ({why})" for t, why in sorted(state.pending.items()))
                + ". This Open WebUI release removes or changes a table or column that owui-crypto's protection "
                "policy seals (owui_crypto.protected_table / owui_crypto.protected_column, shipped in "
                "sql/40_policy.sql and sql/90_coverage.sql). Upgrade to an owui-crypto release whose policy "
                "matches it first; the running instances keep serving the current schema meanwhile")
        self.rebuilt |= state.touched

    def _rollback(self, conn: Connection) -> None:
        conn.info.pop(_STATE, None)


def _dbapi(conn: Connection) -> Any:
    """The migration's DB-API connection: SQL run on it is part of the migration's transaction and passes no
    SQLAlchemy event (ours would see it again)."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None, "a connection that executes has its DB-API connection"
    return dbapi


def _run(dbapi: Any, query: str, params: tuple[Any, ...] | None = None) -> None:
    cursor = dbapi.cursor()
    try:
        cursor.execute(query, params)
    finally:
        cursor.close()


def _rows(dbapi: Any, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    cursor = dbapi.cursor()
    try:
        cursor.execute(query, params)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _rebuild(dbapi: Any, table: str) -> str | None:
    """Build ``table``'s view (and triggers) from the policy and the table as it is now, in a savepoint so that a
    failure leaves the migration's transaction usable; None when built, else PostgreSQL's reason."""
    _run(dbapi, f"SAVEPOINT {_SAVEPOINT}")
    try:
        _run(dbapi, "SELECT owui_crypto.generate(%s::name)", (table,))
        _run(dbapi, "SELECT owui_crypto.grant_runtime()")
    except Exception as exc:  # the DB-API's error; the savepoint takes the transaction back to before the attempt
        _run(dbapi, f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        _run(dbapi, f"RELEASE SAVEPOINT {_SAVEPOINT}")
        return _reason(exc)
    _run(dbapi, f"RELEASE SAVEPOINT {_SAVEPOINT}")
    return None


def protected_tables(url: str) -> frozenset[str]:
    """The policy's tables, or none when owui-crypto is not installed yet (its first start: Open WebUI's
    migrations then run before any view exists)."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True) as conn:
        row = conn.execute("SELECT to_regprocedure('owui_crypto.generate(name)') IS NOT NULL "
                           "AND to_regclass('owui_crypto.protected_table') IS NOT NULL").fetchone()
        if not (row and row[0]):
            return frozenset()
        return frozenset(t for (t,) in conn.execute("SELECT table_name::text FROM owui_crypto.protected_table"))


@contextmanager
def views_kept(url: str) -> Iterator[ViewKeeper | None]:
    """While the body runs Open WebUI's migrations, keep every decrypting view in place (module docstring).
    Yields the keeper (None when owui-crypto is not installed); the listener is removed on the way out."""
    tables = protected_tables(url)
    if not tables:
        yield None
        return
    keeper = ViewKeeper(tables)
    keeper.install()
    try:
        yield keeper
    finally:
        keeper.remove()
