"""Every place Open WebUI 0.12.4 keeps a user's words: sealed, or plaintext by a stated decision.

One canary per table, written through the views as Open WebUI writes, found in plaintext in no base row and
no dump; the owner reads it back; another user reads the placeholder; members of a JSON object that SQL
filters on stay readable without a key; a new content column is reported by name and stops `serve`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import pytest
from psycopg.types.json import Json

from app_adapter import cli
from app_adapter.owui.launcher import ServeRefused, check_drift
from tests.keyring import Keyring


@dataclass(frozen=True)
class Case:
    """One table: how Open WebUI inserts a row of `owner`'s holding `canary`, and how to read it back."""

    table: str
    insert: Callable[[psycopg.Connection, str, str, str], None]  # conn, row id, owner, canary
    read: str  # SELECT of the canary-bearing value by id (%s), through the view


NOW = int(time.time())


def _feedback(conn: psycopg.Connection, rid: str, owner: str, canary: str, table: str = "feedback") -> None:
    conn.execute(f"INSERT INTO {table} (id, user_id, version, type, data, meta, snapshot, created_at, updated_at)"
                 " VALUES (%s, %s, 0, 'rating', %s, %s, %s, %s, %s)",
                 (rid, owner, Json({"rating": 1, "model_id": "m-1", "reason": canary, "comment": canary}),
                  Json({"chat_id": "c-1"}), Json({"chat": {"title": canary, "messages": [{"content": canary}]}}),
                  NOW, NOW))


def _file(conn: psycopg.Connection, rid: str, owner: str, canary: str) -> None:
    conn.execute("INSERT INTO file (id, user_id, filename, meta, data, created_at, updated_at)"
                 " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                 (rid, owner, f"{canary}.txt",
                  Json({"name": f"{canary}.txt", "size": 42, "content_type": "text/plain"}),
                  Json({"status": "completed", "content": canary}), NOW, NOW))


def _calendar_event(conn: psycopg.Connection, rid: str, owner: str, canary: str) -> None:
    conn.execute("INSERT INTO calendar (id, user_id, name, is_default, created_at, updated_at)"
                 " VALUES (%s, %s, 'personal', true, %s, %s) ON CONFLICT DO NOTHING", (f"cal-{owner}", owner, NOW, NOW))
    conn.execute("INSERT INTO calendar_event (id, calendar_id, user_id, title, description, location, start_at,"
                 " all_day, is_cancelled, created_at, updated_at)"
                 " VALUES (%s, %s, %s, %s, %s, %s, %s, false, false, %s, %s)",
                 (rid, f"cal-{owner}", owner, canary, canary, canary, NOW, NOW, NOW))


def _prompt_history(conn: psycopg.Connection, rid: str, owner: str, canary: str) -> None:
    conn.execute("INSERT INTO prompt (id, command, user_id, name, content, created_at, updated_at)"
                 " VALUES (%s, %s, %s, 'p', 'x', %s, %s)", (f"p-{rid}", f"/{rid}", owner, NOW, NOW))
    conn.execute("INSERT INTO prompt_history (id, prompt_id, snapshot, user_id, created_at)"
                 " VALUES (%s, %s, %s, %s, %s)", (rid, f"p-{rid}", Json({"content": canary}), owner, NOW))


CASES = [
    Case("feedback", _feedback,
         "SELECT (data->>'reason') || (data->>'comment') || snapshot::text FROM feedback WHERE id = %s"),
    Case("memory", lambda c, rid, o, x: c.execute(
        "INSERT INTO memory (id, user_id, content, created_at, updated_at) VALUES (%s, %s, %s, %s, %s)",
        (rid, o, x, NOW, NOW)), "SELECT content FROM memory WHERE id = %s"),
    Case("note", lambda c, rid, o, x: c.execute(
        "INSERT INTO note (id, user_id, title, data, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s)",
        (rid, o, x, Json({"content": {"md": x, "html": f"<p>{x}</p>"}}), NOW, NOW)),
        "SELECT title || (data->'content'->>'md') FROM note WHERE id = %s"),
    Case("file", _file, "SELECT filename || (data->>'content') || (meta->>'name') FROM file WHERE id = %s"),
    Case("folder", lambda c, rid, o, x: c.execute(
        "INSERT INTO folder (id, user_id, name, data, is_expanded, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, false, %s, %s)", (rid, o, x, Json({"system_prompt": x}), NOW, NOW)),
        "SELECT name || data::text FROM folder WHERE id = %s"),
    Case("automation", lambda c, rid, o, x: c.execute(
        "INSERT INTO automation (id, user_id, name, data, is_active, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, true, %s, %s)", (rid, o, x, Json({"prompt": x}), NOW, NOW)),
        "SELECT name || data::text FROM automation WHERE id = %s"),
    Case("calendar_event", _calendar_event,
         "SELECT title || description || location FROM calendar_event WHERE id = %s"),
    Case("message", lambda c, rid, o, x: c.execute(
        "INSERT INTO message (id, user_id, channel_id, content, data, created_at, updated_at)"
        " VALUES (%s, %s, 'ch-1', %s, %s, %s, %s)", (rid, o, x, Json({"files": [x]}), NOW, NOW)),
        "SELECT content || data::text FROM message WHERE id = %s"),
    Case("prompt", lambda c, rid, o, x: c.execute(
        "INSERT INTO prompt (id, command, user_id, name, content, created_at, updated_at)"
        " VALUES (%s, %s, %s, 'name', %s, %s, %s)", (rid, f"/{rid}", o, x, NOW, NOW)),
        "SELECT content FROM prompt WHERE id = %s"),
    Case("prompt_history", _prompt_history, "SELECT snapshot::text FROM prompt_history WHERE id = %s"),
]
SHARED = {"message", "prompt", "prompt_history"}  # sealed under the share key: every keyed user reads them


def canary_for(table: str) -> str:
    return f"canary-{table}-5e1f"


@pytest.fixture
def written(app, keyring: Keyring) -> tuple[str, str]:
    """Alice wrote one row of every covered table through the views; returns (alice, bob)."""
    alice, bob = keyring.user(), keyring.user()
    keyring.activate(app, alice)
    for case in CASES:
        case.insert(app, f"{case.table}-1", alice, canary_for(case.table))
    app.commit()
    return alice, bob


@pytest.mark.parametrize("case", CASES, ids=[c.table for c in CASES])
def test_canary_is_sealed_and_opens_for_whom_it_should(app, keyring, written, case: Case) -> None:
    alice, bob = written
    raw = app.execute(f"SELECT t::text FROM public.{case.table} AS t WHERE id = %s", (f"{case.table}-1",)).fetchone()
    assert raw is not None and canary_for(case.table) not in raw[0]
    keyring.activate(app, alice)
    assert canary_for(case.table) in app.execute(case.read, (f"{case.table}-1",)).fetchone()[0]
    app.rollback()
    keyring.activate(app, bob)
    as_bob = app.execute(case.read, (f"{case.table}-1",)).fetchone()[0] or ""
    assert (canary_for(case.table) in as_bob) is (case.table in SHARED)
    assert "oc1:" not in as_bob  # never ciphertext


def test_no_canary_in_a_dump(pg_server, db, written) -> None:
    dump = subprocess.run(["pg_dump", "--data-only", pg_server.url(db)], check=True, capture_output=True,
                          text=True).stdout
    assert [case.table for case in CASES if canary_for(case.table) in dump] == []


def test_members_that_sql_filters_on_stay_readable_without_a_key(app, written) -> None:
    """The leaderboard filters feedback on data's rating and model id; file lists filter on data's status."""
    rows = app.execute("SELECT data->>'rating', data->>'model_id', data->>'reason' FROM feedback").fetchall()
    assert rows == [("1", "m-1", "[encrypted]")]
    assert app.execute("SELECT data->>'status', data->>'content', meta->>'size' FROM file").fetchall() == [
        ("completed", "", "42")]


def test_the_owner_searches_sealed_notes_and_files_in_sql(app, keyring, written) -> None:
    """Open WebUI's note search (ILIKE on title and data's md) and knowledge search (ILIKE on file content)."""
    alice, _ = written
    keyring.activate(app, alice)
    assert app.execute("SELECT id FROM note WHERE title ILIKE %s OR data->'content'->>'md' ILIKE %s",
                       ("%canary-note%", "%canary-note%")).fetchall() == [("note-1",)]
    assert app.execute("SELECT id FROM file WHERE data->>'content' ILIKE %s", ("%canary-file%",)).fetchall() == [
        ("file-1",)]


def test_json_null_and_metadata_stay_as_they_are(app, keyring, written) -> None:
    alice, _ = written
    keyring.activate(app, alice)
    app.execute("UPDATE folder SET data = 'null'::json, is_expanded = true WHERE id = 'folder-1'")
    assert app.execute("SELECT data::text, name FROM public.folder WHERE id = 'folder-1'").fetchone()[0] == "null"


def test_erased_user_leaves_nothing_readable_even_to_a_new_account_with_the_same_id(app, keyring, written) -> None:
    """Deleting a user forgets their key: what Open WebUI leaves behind opens for nobody, the same id included."""
    alice, _ = written
    app.execute("SELECT owui_crypto.forget_user_key(%s)", (alice,))
    app.commit()
    keyring.keys.pop(alice)
    keyring.user(alice)  # the same email signs up again: the same id (KMS HMAC), a new key
    keyring.activate(app, alice)
    for case in CASES:
        value = app.execute(case.read, (f"{case.table}-1",)).fetchone()[0] or ""
        assert (canary_for(case.table) in value) is (case.table in SHARED), case.table


def test_seal_existing_seals_new_tables_and_members(app, keyring, db_url) -> None:
    alice = keyring.user()
    app.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', (alice, "a@x"))
    for table in ("feedback", "memory"):
        app.execute(f"ALTER TABLE public.{table} DISABLE TRIGGER owui_crypto_seal_direct")
    _feedback(app, "fb-old", alice, "legacy-words", table="public.feedback")
    app.execute("INSERT INTO public.memory (id, user_id, content) VALUES ('m-old', %s, 'legacy-memory')", (alice,))
    for table in ("feedback", "memory"):
        app.execute(f"ALTER TABLE public.{table} ENABLE TRIGGER owui_crypto_seal_direct")
    app.commit()
    counts = dict(((t, c), n) for t, c, n in app.execute("SELECT * FROM owui_crypto.unsealed_counts()"))
    assert counts[("feedback", "data")] == 1 and counts[("memory", "content")] == 1
    keyring.activate(app, alice)
    assert app.execute("SELECT owui_crypto.seal_existing(%s)", (alice,)).fetchone()[0] == 2
    raw = app.execute("SELECT data::text FROM public.feedback WHERE id = 'fb-old'").fetchone()[0]
    assert "legacy-words" not in raw and json.loads(raw)["rating"] == 1
    assert app.execute("SELECT data->>'reason', content FROM feedback, memory WHERE feedback.id = 'fb-old'"
                       " AND memory.id = 'm-old'").fetchone() == ("legacy-words", "legacy-memory")


def test_a_new_content_column_is_named_by_check_and_stops_serve(db_url, capsys, monkeypatch) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER DATABASE " + conn.info.dbname + " SET log_error_verbosity = terse")
        assert conn.execute("SELECT * FROM owui_crypto.unclassified_columns()").fetchall() == []
        conn.execute("ALTER TABLE public.note ADD COLUMN summary_words text")
        conn.execute("SELECT owui_crypto.refresh()")
    assert cli.main(["check", "--database-url", db_url]) == 1
    assert "note.summary_words (text) is neither sealed nor plaintext by decision" in capsys.readouterr().out
    with pytest.raises(ServeRefused, match="note.summary_words"):
        check_drift(db_url, {})
    check_drift(db_url, {"OWUI_CRYPTO_ACCEPT_UNCLASSIFIED": "note.summary_words"})
