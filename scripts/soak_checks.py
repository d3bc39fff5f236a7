"""The soak's invariants, checked during the run (pooled connections) and after it (everything else).

Each check returns a list of problems in words an operator can act on, never user text or key material: an empty
list means the invariant held.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from scripts.soak_load import Api, UserLedger, fingerprint, note_value

#: Settings the adapter sets per transaction; none may outlive it on a pooled backend.
KEY_SETTINGS = ("owui_crypto.user_key", "owui_crypto.user_key_id", "owui_crypto.share_key",
                "owui_crypto.share_key_id", "owui_crypto.user_id")
_PROBE = ("SELECT pg_backend_pid(), " + ", ".join(f"current_setting('{s}', true)" for s in KEY_SETTINGS)
          + ", owui_crypto.active_user()")


@dataclass
class PoolProbe:
    """Fresh transactions through PgBouncer, as the role serve uses, on whichever backends the pool hands out."""

    url: str
    checks: int = 0
    backends: set[int] | None = None
    skipped: int = 0

    def run(self, connections: int = 4, transactions: int = 10) -> list[str]:
        problems: list[str] = []
        self.backends = self.backends or set()
        for _ in range(connections):
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=3, prepare_threshold=None) as conn:
                    for _ in range(transactions):
                        row = conn.execute(_PROBE).fetchone()
                        assert row is not None
                        self.checks += 1
                        self.backends.add(row[0])
                        held = [name for name, value in zip((*KEY_SETTINGS, "owui_crypto.active_user()"), row[1:],
                                                            strict=True) if value not in (None, "")]
                        if held:
                            problems.append(f"backend {row[0]}: a fresh transaction through PgBouncer sees "
                                            f"{', '.join(held)} set (a key outlived its transaction)")
            except psycopg.Error:
                self.skipped += 1  # PostgreSQL or PgBouncer restarting: probed again later
        return problems


def secret_forms(secret: bytes) -> list[str]:
    from tests.kms_fixtures import secret_forms as forms

    return forms(secret)


def scan_files(paths: Iterable[Path], markers: dict[str, str], keys: dict[str, bytes]) -> list[str]:
    """No user marker, no form of any key, in any of ``paths`` (a pg_dump, PostgreSQL's log)."""
    problems = []
    needles = [(f"marker of {label}", m.encode()) for label, m in markers.items()]
    for label, key in keys.items():
        needles += [(f"key of {label} ({i})", form.encode()) for i, form in enumerate(secret_forms(key))]
    for path in paths:
        data = path.read_bytes()
        for what, needle in needles:
            if needle in data:
                problems.append(f"{path.name} holds the {what}")
    return problems


def _get(api: Api, action: str, path: str, attempts: int = 4, **kw: Any) -> Any:
    """A read after the run, retried a few times (a fault's last effects); the JSON, or None on 404."""
    last = ""
    for attempt in range(attempts):
        response = api.call(action, "GET", path, **kw)
        if response is not None and response.status_code == 404:
            return None
        if response is not None and response.is_success:
            return response.json()
        last = f"status {response.status_code}" if response is not None else "no answer"
        time.sleep(1 + attempt)
    raise RuntimeError(f"{action} {path.split('?', maxsplit=1)[0]}: {last} after {attempts} attempts")


def read_back(user: UserLedger, api: Api) -> list[str]:
    """Every acknowledged write readable by its owner byte for byte (or one of its uncertain versions); nothing
    else with the user's marker."""
    problems: list[str] = []
    who = user.label
    try:
        for chat in user.chats.values():
            body = _get(api, "final_get_chat", f"/api/v1/chats/{chat.id}")
            if body is None:
                if chat.acked is not None and chat.acked != ("", ()):
                    problems.append(f"{who}: acknowledged chat {chat.id} is gone (404)")
                continue
            fp = fingerprint(body.get("title") or "", body.get("chat") or {})
            if not chat.accepts(fp):
                problems.append(f"{who}: chat {chat.id} reads back as none of its acknowledged or uncertain versions")
        listed = _get(api, "final_list_chats", "/api/v1/chats/list") or []
        for item in listed:
            if item["id"] in user.chats:
                continue
            body = _get(api, "final_get_chat", f"/api/v1/chats/{item['id']}")
            if body is None:
                continue
            fp = fingerprint(body.get("title") or "", body.get("chat") or {})
            if fp in user.unknown_chats:
                continue
            texts = [c for _, c in fp[1]]
            if texts and all(t in user.unknown_texts or any(a.startswith("prefix:") and a[7:].startswith(t)
                                                             for a in user.unknown_texts) for t in texts):
                continue
            problems.append(f"{who}: chat {item['id']} exists but no write of this user made it")
        for note in user.notes.values():
            body = _get(api, "final_get_note", f"/api/v1/notes/{note.id}")
            if body is None:
                problems.append(f"{who}: acknowledged note {note.id} is gone (404)")
            elif not note.accepts(note_value(body)):
                problems.append(f"{who}: note {note.id} reads back as none of its acknowledged or uncertain versions")
        if user.feedback:
            seen: dict[str, str] = {}
            for page in range(1, 100):
                body = _get(api, "final_list_feedback", "/api/v1/evaluations/feedbacks/user", params={"page": page})
                items = (body or {}).get("items") or []
                for item in items:
                    seen[item["id"]] = ((item.get("data") or {}).get("comment")) or ""
                if not items:
                    break
            for fid, comment in user.feedback.items():
                if seen.get(fid) != comment:
                    problems.append(f"{who}: acknowledged feedback {fid} "
                                    f"{'is gone' if fid not in seen else 'reads back changed'}")
        for share_id, chat_id in user.shares.items():
            body = _get(api, "final_get_share", f"/api/v1/chats/share/{share_id}")
            if body is None and chat_id in user.chats:
                problems.append(f"{who}: share {share_id} of chat {chat_id} is gone (404)")
    except RuntimeError as exc:
        problems.append(f"{who}: {exc}")
    return problems


# -- the database after the run ----------------------------------------------------------------------------------

def user_keys(superuser_url: str, user_ids: dict[str, str]) -> tuple[dict[str, bytes], bytes | None]:
    """Each user's DEK, unwrapped from ``"user".kms_encrypted_dek`` by moto (directly, not through the proxy), and
    the deployment's share key. Kept in memory only, to grep for and to open values with."""
    from app_adapter.config import Settings
    from app_adapter.kms import KmsKeys

    kms = KmsKeys(Settings.from_env())
    keys: dict[str, bytes] = {}
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        for label, uid in user_ids.items():
            row = conn.execute('SELECT kms_encrypted_dek FROM public."user" WHERE id = %s', (uid,)).fetchone()
            if row is not None and row[0] is not None:
                keys[label] = kms.unwrap_dek(uid, bytes(row[0])).reveal()
        row = conn.execute("SELECT kms_wrapped FROM owui_crypto.deployment_key WHERE name = 'share'").fetchone()
        share = kms.unwrap_deployment_key("share", bytes(row[0])).reveal() if row else None
    return keys, share


#: Owner-keyed columns opened in Python (table -> ((column, JSON members or None), ...), owner SQL).
_OWNER_SEALED: dict[str, tuple[tuple[tuple[str, tuple[str, ...] | None], ...], str]] = {
    "chat": ((("title", None), ("chat", None), ("summary", None), ("tasks", None), ("variables", None)),
             "t.user_id"),
    "chat_message": ((("content", None), ("output", None), ("files", None), ("sources", None), ("embeds", None),
                      ("status_history", None), ("error", None), ("context_summary", None)),
                     "(SELECT c.user_id FROM public.chat c WHERE c.id = t.chat_id)"),
    "note": ((("title", None), ("data", None)), "t.user_id"),
    "feedback": ((("snapshot", None), ("data", ("reason", "comment"))), "t.user_id"),
}
_SHARE_SEALED = (("shared_chat", ("title", "chat")),)


def sealed_once(superuser_url: str, keys_by_uid: dict[str, bytes], share_key: bytes | None,
                deleted_uids: frozenset[str] = frozenset()) -> tuple[list[str], int]:
    """Open every sealed value once with its owner's key (Python, not the SQL path): it must open, and what it
    opens to must not itself be an envelope that opens (sealed twice). Rows a deleted user left (Open WebUI 0.12.4
    deletes a user's chats, not their notes or feedback) must hold envelopes only: their key is gone with the user.
    Returns (problems, values opened)."""
    from app_adapter import envelope, userkeys

    problems: list[str] = []
    opened = 0

    def check(key: bytes, bind: str, stored: str, is_json: bool, where: str) -> None:
        nonlocal opened
        value = json.loads(stored) if is_json else stored
        if not isinstance(value, str) or not value.startswith(envelope.PREFIX):
            return
        if envelope.key_id_of(value) != userkeys.key_id(key):
            problems.append(f"{where}: sealed under another key than its owner's")
            return
        try:
            inner = envelope.open_(key, bind, value)
        except envelope.SealedValueError:
            problems.append(f"{where}: does not open with its owner's key")
            return
        opened += 1
        candidate = inner
        if is_json:
            try:
                candidate = json.loads(inner)
            except json.JSONDecodeError:
                problems.append(f"{where}: opens to text that is not JSON")
                return
        if isinstance(candidate, str) and candidate.startswith(envelope.PREFIX):
            try:
                envelope.open_(key, bind, candidate)
            except envelope.SealedValueError:
                return  # text that looks like an envelope (the hostile user's): sealed like any text
            problems.append(f"{where}: sealed twice (opens to an envelope that opens again)")

    with psycopg.connect(superuser_url, autocommit=True) as conn:
        json_cols = {(t, c) for t, c in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
            " AND data_type IN ('json', 'jsonb')")}
        for table, (columns, owner_sql) in _OWNER_SEALED.items():
            cols = ", ".join(f"t.{c}::text" for c, _ in columns)
            for row in conn.execute(f"SELECT t.id, {owner_sql}, {cols} FROM public.{table} t"):
                row_id, owner, values = str(row[0]), row[1], row[2:]
                key = keys_by_uid.get(owner)
                for (column, members), stored in zip(columns, values, strict=True):
                    if stored is None:
                        continue
                    where = f"{table}.{column}/{row_id}"
                    if key is None:
                        if owner in deleted_uids:
                            if _plaintext_left(stored, members, (table, column) in json_cols):
                                problems.append(f"{where}: a deleted user's row holds plaintext")
                        else:
                            problems.append(f"{where}: its owner has no key the soak knows of")
                        continue
                    bind = envelope.binding(table, column, row_id)
                    if members is None:
                        check(key, bind, stored, (table, column) in json_cols, where)
                        continue
                    obj = json.loads(stored)
                    for member in members:
                        if isinstance(obj, dict) and isinstance(obj.get(member), str):
                            check(key, f"{bind}#{member}", json.dumps(obj[member]), True, f"{where}#{member}")
        if share_key is not None:
            for table, columns in _SHARE_SEALED:
                cols = ", ".join(f"{c}::text" for c in columns)
                for row in conn.execute(f"SELECT id, {cols} FROM public.{table}"):
                    for column, stored in zip(columns, row[1:], strict=True):
                        if stored is not None:
                            check(share_key, envelope.binding(table, column, str(row[0])), stored,
                                  (table, column) in json_cols, f"{table}.{column}/{row[0]}")
    return problems, opened


def _plaintext_left(stored: str, members: tuple[str, ...] | None, is_json: bool) -> bool:
    from app_adapter import envelope

    value = json.loads(stored) if is_json else stored
    if members is not None:
        parts = [value.get(m) for m in members] if isinstance(value, dict) else []
        return any(isinstance(p, str) and p and not p.startswith(envelope.PREFIX) for p in parts)
    return value is not None and not (isinstance(value, str) and value.startswith(envelope.PREFIX))


def deleted_user_gone(superuser_url: str, deleted: dict[str, str], others: dict[str, str]) -> list[str]:
    """The deleted users' rows are gone (their user row with both wrapped keys, key registration, chats, messages,
    shares); everybody else's remain. Notes and feedback: see :func:`sealed_once`."""
    problems = []
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        for label, uid in deleted.items():
            for table, where in (('"user"', "id = %s"), ("chat", "user_id = %s"), ("chat_message", "user_id = %s"),
                                 ("shared_chat", "user_id = %s"), ("owui_crypto.user_key", "user_id = %s")):
                qualified = table if "." in table else f"public.{table}"
                row = conn.execute(f"SELECT count(*) FROM {qualified} WHERE {where}", (uid,)).fetchone()
                if row and row[0]:
                    problems.append(f"deleted user {label}: {row[0]} rows remain in {table}")
        for label, uid in others.items():
            row = conn.execute('SELECT count(*) FROM public."user" WHERE id = %s', (uid,)).fetchone()
            if not row or row[0] != 1:
                problems.append(f"user {label} was not deleted, but their user row is gone")
    return problems
