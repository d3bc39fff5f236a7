"""Replacing one user's DEK: the incident path for a key that may have leaked.

The memo chose not to rotate DEKs routinely (KMS rotates the CMK that wraps
them); when one user's DEK may be out -- read from a transaction by injected
SQL, say -- ``owui-crypto rekey USER`` gives them a new one and reseals
everything sealed under the old one, in one transaction per user:

1. activate the old key and read the user's sealed values through the views;
2. register the new key in its place (``owui_crypto.replace_user_key``, which
   refuses if the registration changed meanwhile) and store its KMS copy;
3. activate the new key in the same transaction and write the values back
   through the views, which seal them under it.

Other users are untouched and keep working; the user's own rows are locked
until the commit. A crash rolls the user back whole, so running it again
resumes. Only values sealed under the old key are rewritten: placeholders and
plaintext left from before the install are never written back. Other processes
may hold the old key in their cache for up to the cache TTL; ``activate()``
refuses it (OC005) from the commit on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from app_adapter import userkeys
from app_adapter.hook import VIEW_SEARCH_PATH
from app_adapter.keys import KeyService
from app_adapter.sqlrows import scalar
from app_adapter.transport import Transport


@dataclass(frozen=True)
class Rekeyed:
    """What :func:`rekey` did. No key material."""

    user_id: str
    old_key_id: str
    new_key_id: str
    values: int  # sealed values rewritten under the new key
    seconds: float


@dataclass(frozen=True)
class _Column:
    table: str
    row_id: str
    name: str
    cast: str  # the column's type, to write its text back
    owned: sql.Composable  # WHERE clause selecting the user's rows of the table


def _columns(conn: psycopg.Connection[Any], user_id: str) -> list[_Column]:
    """The owner-key columns of the policy, parents first, with the filter for this user's rows."""
    rows = conn.execute(
        "SELECT p.table_name, p.row_id, p.owner_column, p.owner_parent, q.row_id, q.owner_column, c.column_name,"
        "       pg_catalog.format_type(a.atttypid, a.atttypmod)"
        "  FROM owui_crypto.protected_table p"
        "  JOIN owui_crypto.protected_column c ON c.table_name = p.table_name"
        "  JOIN pg_catalog.pg_attribute a ON a.attrelid = pg_catalog.format('public.%I', p.table_name)::regclass"
        "       AND a.attname = c.column_name"
        "  LEFT JOIN owui_crypto.protected_table q ON q.table_name = p.owner_parent"
        " WHERE p.key_kind = 'owner'"
        "   AND pg_catalog.to_regclass(pg_catalog.format('public.%I', p.table_name)) IS NOT NULL"
        " ORDER BY p.owner_parent NULLS FIRST, p.table_name, c.column_name").fetchall()
    columns = []
    for table, row_id, owner_column, parent, parent_row_id, parent_owner, column, cast in rows:
        if parent is None:
            owned: sql.Composable = sql.SQL("t.{} = {}").format(sql.Identifier(owner_column), sql.Literal(user_id))
        else:
            owned = sql.SQL("t.{} IN (SELECT q.{} FROM public.{} AS q WHERE q.{} = {})").format(
                sql.Identifier(owner_column), sql.Identifier(parent_row_id), sql.Identifier(parent),
                sql.Identifier(parent_owner), sql.Literal(user_id))
        columns.append(_Column(table, row_id, column, cast, owned))
    return columns


def _sealed_values(conn: psycopg.Connection[Any], column: _Column, old_key_id: str) -> list[tuple[str, str]]:
    """(row id, opened text) of the values of this column sealed under the old key (members included)."""
    query = sql.SQL(
        "SELECT t.{row_id}::text, v.{col}::text FROM public.{table} AS t"
        " JOIN owui_crypto_view.{table} AS v ON v.{row_id} = t.{row_id}"
        " WHERE ({owned}) AND pg_catalog.strpos(t.{col}::text, {marker}) > 0").format(
        row_id=sql.Identifier(column.row_id), col=sql.Identifier(column.name), table=sql.Identifier(column.table),
        owned=column.owned, marker=sql.Literal(f"oc1:{old_key_id}:"))
    return [(row_id, value) for row_id, value in conn.execute(query)]


def rekey(service: KeyService, user_id: str) -> Rekeyed:
    """Give ``user_id`` a new DEK and reseal what the old one sealed; see the module docstring."""
    started = time.monotonic()
    old = service.dek(user_id)
    new, wrapped = service.kms.new_dek(user_id)
    share = service.share_key()
    transport = Transport()
    with psycopg.connect(service.dsn) as conn:
        old_key_id = scalar(conn, "SELECT key_id FROM owui_crypto.user_key WHERE user_id = %s FOR UPDATE", (user_id,))
        with conn.cursor() as cur:
            transport.activate(cur, user_id, old.reveal(), share.reveal(), search_path=VIEW_SEARCH_PATH)
        opened = [(column, _sealed_values(conn, column, old_key_id)) for column in _columns(conn, user_id)]
        new_key_id = scalar(conn, "SELECT owui_crypto.replace_user_key(%s, %s, %s)",
                            (user_id, userkeys.fingerprint(old), userkeys.fingerprint(new)))
        conn.execute('UPDATE public."user" SET kms_encrypted_dek = %s WHERE id = %s', (wrapped, user_id))
        with conn.cursor() as cur:
            transport.activate(cur, user_id, new.reveal(), share.reveal(), search_path=VIEW_SEARCH_PATH)
        values = 0
        for column, rows in opened:
            update = sql.SQL("UPDATE owui_crypto_view.{table} SET {col} = %s::{cast} WHERE {row_id}::text = %s").format(
                table=sql.Identifier(column.table), col=sql.Identifier(column.name), cast=sql.SQL(column.cast),
                row_id=sql.Identifier(column.row_id))
            for row_id, value in rows:
                conn.execute(update, (value, row_id))
                values += 1
    service.cache.evict(user_id)
    return Rekeyed(user_id, old_key_id, new_key_id, values, time.monotonic() - started)
