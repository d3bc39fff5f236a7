"""``owui-crypto recover``: users' chats back out of PostgreSQL, decrypted in Python.

Why it exists: the normal read path decrypts inside PostgreSQL (pgcrypto, the
views, ``owui_crypto.activate()``). After a disaster that path may be gone --
a ``pg_dump`` of the public schema restored into a fresh server has no
``owui_crypto`` schema and no pgcrypto -- or be the very thing that broke.
Recovery therefore needs only plain SELECTs on Open WebUI's own tables, KMS to
unwrap each user's DEK from ``"user".kms_encrypted_dek``, and ``cryptography``
(:mod:`app_adapter.sealed_rows`).

What it writes into ``out`` (mode 0700; files 0600, they hold plaintext):

* ``<user id>.json`` (an id that is not a plain file name is hashed; the
  report maps ids to files): the user's chats as Open WebUI 0.12.4 exports them
  (``GET /api/v1/chats/all``, one ``ChatResponse`` object per chat, in a JSON
  list as the web client saves an export), so ``POST /api/v1/chats/import``
  or the web UI's import takes them back;
* ``shared/<user id>.json``: the shared-chat snapshots of the user's chats,
  when the deployment's share key is available;
* ``<user id>.INCOMPLETE``: beside an export that lacks something, each value
  that did not open (row and column) and why;
* ``recover-report.json``: counts, timing and every failure, per user.

Fail closed: a chat with any value that does not open is left out of the
export, named in the report and in ``.INCOMPLETE``, and the run ends non-zero.
Each file is written to a temporary name and renamed, so a crash never leaves
a truncated file that reads as a complete export.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from tqdm import tqdm

from app_adapter import userkeys
from app_adapter.errors import CannotUnwrap, InvalidInput, OwuiCryptoError
from app_adapter.kms import KmsKeys
from app_adapter.sealed_rows import POLICY, Failure, Key, Schema, open_row, select_list
from app_adapter.sqlrows import scalar

__all__ = ["REPORT", "Recovery", "RecoveryError", "UserResult", "read_share_key_file", "recover"]

REPORT = "recover-report.json"
SHARE_KEY = "share"  # the deployment key's name, as app_adapter.keys names it

#: ChatResponse of Open WebUI 0.12.4 (models/chats.py), in its field order.
CHAT_FIELDS = ("id", "user_id", "title", "chat", "updated_at", "created_at", "share_id", "archived", "pinned",
               "meta", "variables", "folder_id", "tasks", "summary", "current_message_id")
SHARE_FIELDS = ("id", "chat_id", "user_id", "title", "chat", "created_at", "updated_at")
MESSAGE_FIELDS = ("id", *POLICY["chat_message"])
_FETCH = 200  # rows per round trip of the server-side cursors
_SHOWN_FAILURES = 20  # per user, on the console; the report has them all
_SAFE_NAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,199}")


class RecoveryError(OwuiCryptoError):
    """The database holds nothing to recover from (not Open WebUI's tables)."""


def file_stem(user_id: str) -> str:
    """The user id as a file name; an id that is not a plain name (a damaged or hostile dump: "../x") is hashed."""
    if _SAFE_NAME.fullmatch(user_id):
        return user_id
    return "user-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:24]


@dataclass
class UserResult:
    """What was recovered for one user, and what was not."""

    user_id: str
    file: str = ""  # the export's file name in out
    chats: int = 0  # chats in the export
    messages: int = 0  # chat_message rows opened (checked; Open WebUI rebuilds them from chat.chat on import)
    shares: int = 0  # shared-chat snapshots written
    shares_skipped: int = 0  # snapshots left sealed: no share key
    rows: int = 0  # rows read
    key_note: str = ""  # why the user's own key is unavailable, if it is
    problems: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems and not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "file": self.file, "complete": self.complete, "chats": self.chats,
                "messages": self.messages, "shares": self.shares, "shares_skipped": self.shares_skipped,
                "rows": self.rows,
                "key_unavailable": self.key_note or None, "problems": self.problems,
                "failures": [f.as_dict() for f in self.failures]}


@dataclass
class Recovery:
    """One run: every user's result, and the numbers of the summary line."""

    out: Path
    share_key: str  # "available", or why not
    users: list[UserResult] = field(default_factory=list)
    seconds: float = 0.0
    aborted: str = ""

    @property
    def complete(self) -> bool:
        return not self.aborted and all(u.complete for u in self.users)

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.users)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def problem_lines(self) -> list[str]:
        """One line per problem, at most a screenful per user; the report holds everything."""
        lines = []
        for user in self.users:
            if user.complete:
                continue
            lines.append(f"user {user.user_id}: INCOMPLETE export ({len(user.failures)} values did not open)")
            lines += [f"  {p}" for p in user.problems]
            lines += [f"  {f}" for f in user.failures[:_SHOWN_FAILURES]]
            if len(user.failures) > _SHOWN_FAILURES:
                lines.append(f"  ... and {len(user.failures) - _SHOWN_FAILURES} more in {self.out / REPORT}")
        skipped = sum(u.shares_skipped for u in self.users)
        if skipped:
            lines.append(f"warning: {skipped} shared-chat snapshots left out: {self.share_key} (the chats "
                         "themselves are in the exports)")
        return lines

    def summary(self) -> str:
        incomplete = sum(not u.complete for u in self.users)
        return (f"owui-crypto: recovered {len(self.users)} users ({len(self.users) - incomplete} complete, "
                f"{incomplete} incomplete) into {self.out}: {sum(u.chats for u in self.users)} chats, "
                f"{sum(u.messages for u in self.users)} messages checked, "
                f"{sum(u.shares for u in self.users)} shared snapshots; {self.rows} rows in {self.seconds:.2f} s "
                f"({self.rows_per_second:,.0f} rows/s)")

    def as_dict(self) -> dict[str, Any]:
        return {"complete": self.complete, "aborted": self.aborted or None, "share_key": self.share_key,
                "seconds": round(self.seconds, 3), "rows": self.rows,
                "rows_per_second": round(self.rows_per_second, 1), "users": [u.as_dict() for u in self.users]}


class _JsonList:
    """A JSON list written item by item under a temporary name, renamed into place by :meth:`commit`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".partial")
        self._tmp.unlink(missing_ok=True)
        self._file: TextIO = os.fdopen(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                                       "w", encoding="utf-8")
        self._file.write("[")
        self.count = 0

    def add(self, item: dict[str, Any]) -> None:
        self._file.write(("," if self.count else "") + "\n" + json.dumps(item, ensure_ascii=False))
        self.count += 1

    def commit(self) -> None:
        self._file.write("\n]\n")
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_share_key_file(path: Path) -> bytes:
    """The share key's KMS blob saved as base64 (``owui_crypto.deployment_key.kms_wrapped``, see README)."""
    try:
        return base64.b64decode("".join(path.read_text(encoding="ascii").split()), validate=True)
    except (OSError, UnicodeError, binascii.Error) as exc:
        raise InvalidInput(f"{path}: not a readable base64 file of the share key's kms_wrapped ({exc})") from None


def _share_key(conn: psycopg.Connection, kms: KmsKeys, wrapped: bytes | None) -> Key:
    """The deployment's share key: from ``wrapped`` if given, else from owui_crypto.deployment_key if present."""
    if wrapped is None:
        where = "owui_crypto.deployment_key"
        try:
            if scalar(conn, "SELECT pg_catalog.to_regclass('owui_crypto.deployment_key')") is None:
                return Key.unavailable(f"no {where} in this database (a dump of the public schema only?); "
                                       "pass --share-key-file")
            row = conn.execute("SELECT kms_wrapped FROM owui_crypto.deployment_key WHERE name = %s",
                               (SHARE_KEY,)).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            conn.rollback()
            return Key.unavailable(f"this role may not read {where}; pass --share-key-file")
        if row is None:
            return Key.unavailable(f"no share key is registered in {where}")
        wrapped = bytes(row[0])
    else:
        where = "--share-key-file"
    try:
        key = kms.unwrap_deployment_key(SHARE_KEY, wrapped)
    except CannotUnwrap as exc:
        return Key.unavailable(f"the share key from {where} does not unwrap: {exc}")
    return Key(key, userkeys.key_id(key))


def _user_key(conn: psycopg.Connection, kms: KmsKeys, schema: Schema, user_id: str) -> tuple[Key, bool]:
    """The user's DEK through KMS, and whether the user has a row in "user"."""
    if not schema.has("user", "id"):
        return Key.unavailable('no "user" table in this database'), False
    if not schema.has("user", "kms_encrypted_dek"):
        return Key.unavailable('"user" has no kms_encrypted_dek column (owui-crypto was never installed)'), True
    row = conn.execute('SELECT kms_encrypted_dek FROM public."user" WHERE id = %s', (user_id,)).fetchone()
    if row is None:
        return Key.unavailable(f'user {user_id} has no row in "user" (deleted?), so no wrapped key'), False
    if row[0] is None:
        return Key.unavailable(f'"user".kms_encrypted_dek of {user_id} is empty (the user was forgotten, or '
                               "never provisioned); restore it from an older backup"), True
    try:
        dek = kms.unwrap_dek(user_id, bytes(row[0]))
    except CannotUnwrap as exc:
        return Key.unavailable(str(exc)), True
    return Key(dek, userkeys.key_id(dek)), True


def _rows(conn: psycopg.Connection, query: sql.Composed, params: tuple[Any, ...]) -> Iterator[dict[str, Any]]:
    """Rows through a server-side cursor: a user with thousands of long chats never sits in memory whole."""
    with conn.cursor(name="owui_crypto_recover", row_factory=dict_row) as cur:
        cur.itersize = _FETCH
        cur.execute(query, params)
        yield from cur


def _chat_response(chat: dict[str, Any]) -> dict[str, Any]:
    """A chat row as Open WebUI's ChatResponse serialises it (its defaults and normalisations)."""
    out = {name: chat.get(name) for name in CHAT_FIELDS}
    out["title"] = out["title"] if out["title"] is not None else ""
    out["chat"] = out["chat"] if isinstance(out["chat"], dict) else {}
    out["archived"] = bool(out["archived"])
    out["pinned"] = out["pinned"] if out["pinned"] is not None else False
    out["meta"] = out["meta"] if isinstance(out["meta"], dict) else {}
    out["variables"] = out["variables"] if isinstance(out["variables"], dict) else {}
    out["context_usage"] = None
    return out


@dataclass(frozen=True)
class _Run:
    """What every user's recovery shares: the connection, KMS, the tables found, the share key, the output."""

    conn: psycopg.Connection
    kms: KmsKeys
    schema: Schema
    share: Key
    out: Path


def _export_chats(run: _Run, user: UserResult, key: Key) -> None:
    query = sql.SQL("SELECT {} FROM public.chat c WHERE c.user_id = %s ORDER BY c.updated_at DESC, c.id").format(
        select_list(run.schema, "chat", CHAT_FIELDS, "c"))
    sink = _JsonList(run.out / user.file)
    try:
        for row in _rows(run.conn, query, (user.user_id,)):
            user.rows += 1
            opened = open_row("chat", row, key, run.schema, user.failures)
            if opened is not None:
                sink.add(_chat_response(opened))
                user.chats += 1
    except BaseException:
        sink.abort()
        raise
    sink.commit()


def _check_messages(run: _Run, user: UserResult, key: Key) -> None:
    """Open every message row of the user's chats: a damaged one is a failure even though chat.chat is whole."""
    if not run.schema.has("chat_message", "id", "chat_id"):
        return
    query = sql.SQL("SELECT {} FROM public.chat_message m JOIN public.chat c ON c.id = m.chat_id"
                    " WHERE c.user_id = %s").format(select_list(run.schema, "chat_message", MESSAGE_FIELDS, "m"))
    for row in _rows(run.conn, query, (user.user_id,)):
        user.rows += 1
        if open_row("chat_message", row, key, run.schema, user.failures) is not None:
            user.messages += 1


def _export_shares(run: _Run, user: UserResult) -> None:
    """Snapshots of the user's chats (a share's owner is its chat's owner), if the share key opens them."""
    if not run.schema.has("shared_chat", "id", "chat_id", "user_id"):
        return
    query = sql.SQL("SELECT {} FROM public.shared_chat s LEFT JOIN public.chat c ON c.id = s.chat_id"
                    " WHERE coalesce(c.user_id, s.user_id) = %s ORDER BY s.id").format(
        select_list(run.schema, "shared_chat", SHARE_FIELDS, "s"))
    path = run.out / "shared" / user.file
    sink: _JsonList | None = None
    try:
        for row in _rows(run.conn, query, (user.user_id,)):
            user.rows += 1
            failures: list[Failure] = []
            opened = open_row("shared_chat", row, run.share, run.schema, failures)
            if opened is None and all(f.no_key for f in failures) and run.share.material is None:
                user.shares_skipped += 1
                continue
            user.failures += failures
            if opened is not None:
                if sink is None:
                    path.parent.mkdir(mode=0o700, exist_ok=True)
                    sink = _JsonList(path)
                sink.add({name: opened.get(name) for name in SHARE_FIELDS})
                user.shares += 1
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if sink is not None:
        sink.commit()
    else:
        path.unlink(missing_ok=True)  # no stale snapshot file from an earlier run


def _recover_user(run: _Run, user_id: str) -> UserResult:
    """Export one user, in one read-only snapshot of the database."""
    user = UserResult(user_id, file=f"{file_stem(user_id)}.json")
    key, known = _user_key(run.conn, run.kms, run.schema, user_id)
    user.key_note = key.missing
    _export_chats(run, user, key)
    _check_messages(run, user, key)
    _export_shares(run, user)
    run.conn.rollback()
    if not known and not user.rows:
        user.problems.append(f"no user {user_id} in this database (no \"user\" row, no chats)")
    marker = run.out / f"{file_stem(user_id)}.INCOMPLETE"
    if user.complete:
        marker.unlink(missing_ok=True)
    else:
        _write_private(marker, "\n".join([f"The export of user {user_id} is INCOMPLETE.", *user.problems,
                                          *(str(f) for f in user.failures)]) + "\n")
    return user


def all_users(conn: psycopg.Connection, schema: Schema) -> list[str]:
    """Every user id with a "user" row or a chat (a chat can outlive its user row)."""
    parts = []
    if schema.has("user", "id"):
        parts.append('SELECT id FROM public."user"')
    parts.append("SELECT user_id FROM public.chat WHERE user_id IS NOT NULL")
    return [r[0] for r in conn.execute(" UNION ".join(parts) + " ORDER BY 1")]


def recover(dsn: str, kms: KmsKeys, out: Path, user_ids: Sequence[str] | None = None, *,
            share_wrapped: bytes | None = None, progress: bool = True) -> Recovery:
    """Export ``user_ids`` (None: every user) from the database at ``dsn`` into ``out``.

    KMS errors other than a blob that does not unwrap (KMS unreachable,
    throttled, key disabled) stop the run: they would fail every user alike.
    The report is written either way.
    """
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        schema = Schema.discover(conn, [*POLICY, "user"])
        if not schema.has("chat", "id", "user_id", "title", "chat"):
            raise RecoveryError("no Open WebUI chat table (public.chat with id, user_id, title, chat) in this "
                                "database: is DATABASE_URL / --database-url the right database?")
        share = _share_key(conn, kms, share_wrapped)
        users = list(dict.fromkeys(user_ids)) if user_ids is not None else all_users(conn, schema)
        conn.rollback()
        recovery = Recovery(out, "available" if share.material is not None else share.missing)
        run = _Run(conn, kms, schema, share, out)
        try:
            bar = tqdm(users, desc="recovering", unit="user", disable=not progress)
            for user_id in bar:
                recovery.users.append(_recover_user(run, user_id))
                bar.set_postfix(rows=recovery.rows, refresh=False)
        except BaseException as exc:
            recovery.aborted = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            recovery.seconds = time.perf_counter() - started
            _write_private(out / REPORT, json.dumps(recovery.as_dict(), indent=2) + "\n")
    return recovery
