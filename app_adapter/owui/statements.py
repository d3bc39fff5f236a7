"""The one Open WebUI statement PostgreSQL refuses on the decrypting views.

``ChatMessages.upsert_messages`` (``models/chat_messages.py:335``) backfills
missing ``chat_message`` rows with ``INSERT ... ON CONFLICT (id) DO NOTHING``.
PostgreSQL rejects ``ON CONFLICT`` on a view with INSTEAD OF triggers (a
view has no unique index: "there is no unique or exclusion constraint
matching the ON CONFLICT specification"), so through
``owui_crypto_view.chat_message`` the self-healing would always fail (Open
WebUI logs "Backfill failed" and goes on).

Exactly that statement -- a PostgreSQL ``INSERT`` into Open WebUI's
``chat_message`` table with ``ON CONFLICT DO NOTHING`` -- is sent to the base
table ``public.chat_message`` instead. Nothing is lost: the base table's
BEFORE trigger (``owui_crypto.seal_direct_chat_message``) seals every
plaintext value with the transaction's key and applies the same owner check
as the view, so the row is stored sealed or the statement is refused.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql.dml import OnConflictDoNothing

log = logging.getLogger("owui_crypto.statements")

BASE_SCHEMA = "public"


class UpsertRetarget:
    """``before_cursor_execute`` listener retargeting the upsert of one table to its base table."""

    def __init__(self, table: Any, schema: str = BASE_SCHEMA) -> None:
        self.table = table
        self.prefix = f"INSERT INTO {table.name} "
        self.replacement = f"INSERT INTO {schema}.{table.name} "
        self.count = 0

    def matches(self, statement: str, context: Any) -> bool:
        compiled = getattr(context, "compiled", None)
        stmt = getattr(compiled, "statement", None)
        if not isinstance(stmt, PgInsert) or not isinstance(stmt._post_values_clause, OnConflictDoNothing):
            return False
        # The ORM hands over an annotated copy of the table: compare what it names.
        table = stmt.table
        return (table.name, table.schema) == (self.table.name, self.table.schema) and statement.startswith(self.prefix)

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> tuple[str, Any]:
        if self.matches(statement, context):
            self.count += 1
            statement = self.replacement + statement[len(self.prefix):]
        return statement, parameters

    def install(self, engine: Any) -> None:
        event.listen(getattr(engine, "sync_engine", engine), "before_cursor_execute", self, retval=True)
