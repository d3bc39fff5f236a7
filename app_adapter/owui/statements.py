"""Open WebUI statements that the decrypting views need in another shape.

Two of them: the one PostgreSQL refuses on a view (the ``chat_message``
upsert, :class:`UpsertRetarget`), and chat search, which works as written but
opens every value several times (:class:`SearchRewrite`).

The upsert
----------

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
import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql.dml import OnConflictDoNothing

log = logging.getLogger("owui_crypto.statements")

BASE_SCHEMA = "public"


class _Listener:
    """A ``before_cursor_execute`` listener that may return another statement."""

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> tuple[str, Any]:
        raise NotImplementedError

    def install(self, engine: Any) -> None:
        event.listen(getattr(engine, "sync_engine", engine), "before_cursor_execute", self, retval=True)


class UpsertRetarget(_Listener):
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


# -- chat search ---------------------------------------------------------------------------------------

# Open WebUI 0.12.4's chat search (models/chats.py, get_chats_by_user_id_and_search_text and
# chat_search_message_content_match_sql) as SQLAlchemy compiles it for psycopg. Through the views every
# reference to a sealed column is a decryption of its own, and the statement names each one several times:
# per chat the title twice and the body three times (its \u0000 filter, history.messages, the legacy list),
# per message the content twice, in a subquery that runs again in ORDER BY CASE. At 200 chats of 10
# messages that is ~9,000 decryptions for ~2,400 values.
_FROM_WHERE = "\nFROM chat \nWHERE "
#: A reference to a sealed column of chat (sql/40_policy.sql, sql/90_coverage.sql): a WHERE conjunct without
#: one filters on plaintext and can run before anything is opened. (Wrongly sorted, a conjunct still filters
#: the same rows; only the number of values opened changes.)
_SEALED_CHAT_COLUMN = re.compile(r"\bchat\.(title|chat|summary|tasks|variables)\b", re.IGNORECASE)
_MESSAGE_SCAN = re.compile(
    r"FROM chat_message AS message\s+WHERE message\.chat_id = Chat\.id\s+AND message\.user_id = Chat\.user_id\s+"
    r"AND json_typeof\(message\.content\) = 'string'\s+AND LOWER\(message\.content #>> '\{\}'\) LIKE ")
_ORDER_CASE = "ORDER BY CASE WHEN "
_CASE_END = re.compile(r"\s*THEN %\(\w+\)s::INTEGER ELSE %\(\w+\)s::INTEGER END, ")


class SearchRewrite(_Listener):
    """``before_cursor_execute`` listener: Open WebUI's chat search, reshaped to open each value once.

    Three rewrites, each applied only where the statement has exactly the shape above, and each leaving the
    rows and their order as they were:

    * the user's chats are read once, in a subquery that is not flattened (``OFFSET 0``), so title and body
      are opened once per chat and the filters and subqueries use the opened values;
    * each ``chat_message`` row's content is opened once, in a ``LATERAL (... OFFSET 0)`` projection that
      both tests of the subquery read (a nested loop over the chat's messages, through their index);
    * a one-term search drops its ``ORDER BY CASE WHEN <match> ...``: the same ``<match>`` is a top-level
      conjunct of its WHERE, so every row returned sorts 0 and the CASE only ran the match again.

    A statement of any other shape (another Open WebUI release) passes as it is, only slower.
    """

    def __init__(self) -> None:
        self.count = 0

    def rewrite(self, statement: str) -> str:
        if "FROM chat_message AS message" not in statement or not statement.startswith("SELECT chat.id, "):
            return statement
        start = statement.find(_FROM_WHERE)
        end = statement.find(" ORDER BY ", start)
        if start < 0 or end < 0 or " FOR UPDATE" in statement:
            return statement
        conjuncts = _conjuncts(statement[start + len(_FROM_WHERE):end])
        plain = [c for c in conjuncts or [] if not _SEALED_CHAT_COLUMN.search(c)]
        if not any(c.startswith("chat.user_id = ") for c in plain):
            return statement
        statement = (statement[:start]
                     + f"\nFROM (SELECT * FROM chat WHERE {' AND '.join(plain)} OFFSET 0) AS chat \nWHERE "
                     + statement[start + len(_FROM_WHERE):])
        statement = _MESSAGE_SCAN.sub(
            "FROM chat_message AS message_row CROSS JOIN LATERAL (SELECT message_row.content OFFSET 0) AS message\n"
            "                WHERE message_row.chat_id = Chat.id AND message_row.user_id = Chat.user_id\n"
            "                AND json_typeof(message.content) = 'string' AND LOWER(message.content #>> '{}') LIKE ",
            statement)
        if "term_title_key_" not in statement:
            statement = _drop_constant_case(statement)
        self.count += 1
        return statement

    def __call__(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> tuple[str, Any]:
        return self.rewrite(statement), parameters


def _depths(text: str, start: int = 0) -> Iterator[tuple[int, int]]:
    """(index, parenthesis depth after it) of each character from ``start`` outside string literals (every
    quote flips in and out of a literal, so SQL's doubled quote needs nothing of its own)."""
    depth, quoted = 0, False
    for i in range(start, len(text)):
        char = text[i]
        if char == "'":
            quoted = not quoted
        elif not quoted:
            depth += (char == "(") - (char == ")")
            yield i, depth


def _closing_paren(text: str, start: int) -> int | None:
    """Index of the parenthesis closing the one at ``start``, or None."""
    return next((i for i, depth in _depths(text, start) if depth == 0 and text[i] == ")"), None)


def _conjuncts(where: str) -> list[str] | None:
    """The top-level ``AND`` terms of a WHERE clause, or None if its parentheses or quotes do not balance."""
    if _depth(where) != 0 or where.count("'") % 2:
        return None
    terms, begin = [], 0
    for i, depth in _depths(where):
        if i >= begin and depth == 0 and where.startswith(" AND ", i):
            terms.append(where[begin:i])
            begin = i + 5
    return [*terms, where[begin:]]


def _depth(text: str) -> int:
    """Parenthesis depth at the end of ``text``."""
    return next(reversed([depth for _, depth in _depths(text)]), 0)


def _drop_constant_case(statement: str) -> str:
    """Remove ``CASE WHEN (m) THEN 0 ELSE 1 END,`` from ORDER BY when ``(m)`` is a top-level conjunct of WHERE."""
    at = statement.find(_ORDER_CASE)
    if at < 0 or statement.count(_ORDER_CASE) != 1:
        return statement
    open_at = at + len(_ORDER_CASE)
    close_at = _closing_paren(statement, open_at) if statement.startswith("(", open_at) else None
    end = _CASE_END.match(statement, close_at + 1) if close_at is not None else None
    if close_at is None or end is None:
        return statement
    match = statement[open_at:close_at + 1]
    where = statement[:at]
    conjunct = where.find(" AND " + match + " AND ")
    if conjunct < 0 or where.find(" AND " + match, conjunct + 1) >= 0 or _depth(where[:conjunct]) != 0:
        return statement
    return statement[:at] + "ORDER BY " + statement[end.end():]
