"""``owui-crypto recover``: chats back out of a dump restored without owui-crypto, decrypted in Python.

Chats are written as Open WebUI writes them: users provisioned through
KeyService (moto's KMS over HTTP), keys activated by the engine hook, rows
inserted through the decrypting views. The database is then dumped (public
schema only) and restored into a fresh database that has no owui_crypto schema
and no pgcrypto, and the command runs there as an operator would run it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from psycopg.types.json import Json

from app_adapter import envelope, userkeys
from app_adapter.devdb import Server
from app_adapter.hook import Adapter
from app_adapter.keys import KeyService
from app_adapter.recover import REPORT, file_stem
from app_adapter.sealed_rows import POLICY, Key, Schema, open_row
from app_adapter.secret import SecretBytes
from tests.dumps import restore_public_dump
from tests.owui import insert_chat

# Text that a careless encoder would change: quotes, backslashes, escapes, non-ASCII, a JS line separator.
AWKWARD = 'naïve "quoted" \\ back\\slash\n\ttab \u2028 <b>&amp;</b> 🚀 Ω≈ç√ \U0001d518\U0001d52b\U0001d526'


def owui_crypto(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app_adapter.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, env=dict(os.environ), timeout=300)


@dataclass
class Written:
    """What the test wrote, as the owner's SQL view returned it right after."""

    users: list[str]
    chats: dict[str, dict[str, dict]] = field(default_factory=dict)  # user -> chat id -> {title, chat, summary, texts}
    messages: dict[str, list[str]] = field(default_factory=dict)  # chat id -> chat_message ids
    shares: dict[str, dict] = field(default_factory=dict)  # share id -> {chat_id, title, chat}


def add_users(db_url: str, service: KeyService, ids: list[str]) -> None:
    with psycopg.connect(db_url) as conn:
        for uid in ids:
            conn.execute('INSERT INTO public."user" (id, email, name, role) VALUES (%s, %s, %s, %s)',
                         (uid, f"{uid}@example.com", uid[:8], "user"))
            service.provision(conn, uid)


def write_chats(db_url: str, service: KeyService, users: list[str], per_user: int = 3) -> Written:
    """Chats with messages (and one share) through the adapter's activation path, as Open WebUI writes them."""
    written = Written(users)
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=1)
    adapter = Adapter(service, lazy=False)  # rows go through the raw driver connection: keys at BEGIN
    adapter.install(engine)
    try:
        for uid in users:
            written.chats[uid] = {}
            with adapter.acting_as_sync(uid), engine.begin() as sa_conn:
                conn = sa_conn.connection.driver_connection
                for i in range(per_user):
                    texts = [f"{uid[:8]} asks {i}: {AWKWARD}", f"answer {i} " + "long " * 4000, f"thanks {i} ✓"]
                    title = f"chat {i} of {uid[:8]} — {AWKWARD[:20]}"
                    cid = insert_chat(conn, uid, title, [("user", texts[0]), ("assistant", texts[1]),
                                                         ("user", texts[2])])
                    title_back, doc, summary = conn.execute(
                        "SELECT title, chat::text, summary FROM chat WHERE id = %s", (cid,)).fetchone()
                    written.chats[uid][cid] = {"title": title_back, "chat": json.loads(doc), "summary": summary,
                                               "texts": texts}
                    written.messages[cid] = [r[0] for r in conn.execute(
                        "SELECT id FROM chat_message WHERE chat_id = %s ORDER BY id", (cid,))]
                    assert title_back == title
                cid = next(iter(written.chats[uid]))
                share_id = str(uuid.uuid4())
                snapshot = written.chats[uid][cid]["chat"]
                conn.execute("INSERT INTO shared_chat (id, chat_id, user_id, title, chat, created_at, updated_at)"
                             " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                             (share_id, cid, uid, f"shared {AWKWARD}", Json(snapshot), int(time.time()),
                              int(time.time())))
                conn.execute("UPDATE chat SET share_id = %s WHERE id = %s", (share_id, cid))
                written.shares[share_id] = {"chat_id": cid, "title": f"shared {AWKWARD}", "chat": snapshot}
    finally:
        adapter.uninstall()
        engine.dispose()
    with psycopg.connect(db_url) as conn:  # really sealed at rest
        assert all(t.startswith("oc1:") for (t,) in conn.execute("SELECT title FROM public.chat"))
        assert all(c.startswith('"oc1:') for (c,) in conn.execute("SELECT content::text FROM public.chat_message"))
    return written


@pytest.fixture
def world(db_url: str, service: KeyService) -> Written:
    users = [f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"]
    add_users(db_url, service, users)
    return write_chats(db_url, service, users)


@pytest.fixture
def restored(pg_server: Server, db_url: str, world: Written, tmp_path: Path) -> Iterator[str]:
    url = restore_public_dump(pg_server, db_url, tmp_path)
    yield url
    pg_server.drop_database(url.rsplit("/", 1)[1])


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def report(out: Path) -> dict:
    return {u["user_id"]: u for u in json.loads((out / REPORT).read_text())["users"]}


def assert_export_matches(out: Path, written: Written, uid: str, leave_out: set[str] = frozenset()) -> None:
    chats = {c["id"]: c for c in load(out / f"{uid}.json")}
    expected = {cid: w for cid, w in written.chats[uid].items() if cid not in leave_out}
    assert set(chats) == set(expected)
    for cid, want in expected.items():
        got = chats[cid]
        assert got["user_id"] == uid and got["title"] == want["title"] and got["summary"] == want["summary"]
        assert got["chat"] == want["chat"]  # the whole document: history tree, legacy list, params
        history = got["chat"]["history"]["messages"]
        assert sorted(m["content"] for m in history.values()) == sorted(want["texts"])  # byte for byte
        assert [m["content"] for m in got["chat"]["messages"]] == want["texts"]
        assert got["meta"] == {"tags": ["t1"]} and got["archived"] is False
        assert list(got) == ["id", "user_id", "title", "chat", "updated_at", "created_at", "share_id", "archived",
                             "pinned", "meta", "variables", "folder_id", "tasks", "summary", "current_message_id",
                             "context_usage"]  # Open WebUI 0.12.4's ChatResponse


def test_recovers_both_users_from_a_public_dump_restored_without_owui_crypto(restored, world, db_url, tmp_path):
    out = tmp_path / "out"
    alice, bob = world.users
    result = owui_crypto("recover", "--out", out, "--user", alice, "--user", bob, "--database-url", restored,
                         "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    for uid in world.users:
        assert_export_matches(out, world, uid)
        assert not (out / f"{uid}.INCOMPLETE").exists()
        assert (out / f"{uid}.json").stat().st_mode & 0o077 == 0  # plaintext: owner-only
    assert out.stat().st_mode & 0o077 == 0
    # The dump has no owui_crypto.deployment_key: snapshots are left out, loudly, not failed.
    assert "2 shared-chat snapshots left out" in result.stdout and "--share-key-file" in result.stdout
    assert not (out / "shared").exists()
    assert "rows/s" in result.stdout and "2 complete, 0 incomplete" in result.stdout
    print(result.stdout.strip().splitlines()[-1])
    by_user = report(out)
    assert by_user[alice]["chats"] == 3 and by_user[alice]["messages"] == 9 and by_user[alice]["shares_skipped"] == 1

    # With the share key's KMS blob saved beside the dump, the snapshots come back too.
    with psycopg.connect(db_url) as conn:
        (wrapped,) = conn.execute("SELECT kms_wrapped FROM owui_crypto.deployment_key WHERE name = 'share'").fetchone()
    key_file = tmp_path / "share-key.b64"
    key_file.write_text(base64.b64encode(bytes(wrapped)).decode() + "\n")
    again = owui_crypto("recover", "--out", out, "--all", "--share-key-file", key_file, "--database-url", restored,
                        "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "left out" not in again.stdout
    for uid in world.users:
        (snapshot,) = load(out / "shared" / f"{uid}.json")
        want = world.shares[snapshot["id"]]
        assert snapshot["chat_id"] == want["chat_id"] and snapshot["title"] == want["title"]
        assert snapshot["chat"] == want["chat"] and snapshot["user_id"] == uid
        exported = {c["id"]: c for c in load(out / f"{uid}.json")}
        assert exported[want["chat_id"]]["share_id"] == snapshot["id"]


def test_live_database_all_users_by_email_and_policy_mirror(db_url, service, world, tmp_path):
    carol = service.kms.user_id("Carol@Example.com")  # ids are the KMS HMAC of the email, as at sign-up
    add_users(db_url, service, [carol])
    write_chats(db_url, service, [carol], per_user=1)
    out = tmp_path / "out"
    by_email = owui_crypto("recover", "--out", out, "--email", "carol@example.com", "--database-url", db_url,
                           "--no-progress")
    assert by_email.returncode == 0, by_email.stdout + by_email.stderr
    assert [c["title"] for c in load(out / f"{carol}.json")] == [f"chat 0 of {carol[:8]} — {AWKWARD[:20]}"]
    # On the live database the share key comes from owui_crypto.deployment_key.
    result = owui_crypto("recover", "--out", out, "--all", "--database-url", db_url, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 users (3 complete, 0 incomplete)" in result.stdout
    for uid in world.users:
        assert_export_matches(out, world, uid)
        assert len(load(out / "shared" / f"{uid}.json")) == 1
    with psycopg.connect(db_url) as conn:  # recover's copy of the policy is the installed one, for what it exports
        policy: dict[str, set[str]] = {}
        for table, column in conn.execute("SELECT table_name, column_name FROM owui_crypto.protected_column"
                                          " WHERE table_name = ANY(%s)", (list(POLICY),)):
            policy.setdefault(table, set()).add(column)
    assert policy == {t: set(c) for t, c in POLICY.items()}


def test_a_role_that_reads_only_public_tables_recovers_and_says_why_shares_are_missing(pg_server, db_url, world,
                                                                                       tmp_path):
    role = f"owui_crypto_t_reader_{secrets.token_hex(4)}"
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with psycopg.connect(db_url) as conn:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {0}; GRANT SELECT ON ALL TABLES IN SCHEMA public"
                                 " TO {0}").format(sql.Identifier(role)))
        parts = urlsplit(db_url)
        as_reader = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
        out = tmp_path / "out"
        result = owui_crypto("recover", "--out", out, "--all", "--database-url", as_reader, "--no-progress")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "may not read owui_crypto.deployment_key" in result.stdout
        for uid in world.users:
            assert_export_matches(out, world, uid)
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with pg_server.connect() as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_tampered_and_moved_values_fail_closed_naming_the_row(restored, world, tmp_path):
    alice, bob = world.users
    tampered, moved_to, kept = list(world.chats[alice])
    victim = world.messages[moved_to][0]
    with psycopg.connect(restored) as conn:
        (title,) = conn.execute("SELECT title FROM public.chat WHERE id = %s", (tampered,)).fetchone()
        flipped = title[:40] + ("A" if title[40] != "A" else "B") + title[41:]
        conn.execute("UPDATE public.chat SET title = %s WHERE id = %s", (flipped, tampered))
        # A valid ciphertext of the same user, copied into another row: its binding no longer matches.
        conn.execute("UPDATE public.chat_message SET content = (SELECT content FROM public.chat_message WHERE id = %s)"
                     " WHERE id = %s", (world.messages[kept][0], victim))
    out = tmp_path / "out"
    result = owui_crypto("recover", "--out", out, "--all", "--database-url", restored, "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"chat.title/{tampered}: failed its integrity check" in result.stdout
    assert f"chat_message.content/{victim}: failed its integrity check" in result.stdout
    assert "1 complete, 1 incomplete" in result.stdout
    assert_export_matches(out, world, alice, leave_out={tampered})  # never a chat with a hole in it
    assert_export_matches(out, world, bob)
    marker = (out / f"{alice}.INCOMPLETE").read_text()
    assert f"chat.title/{tampered}" in marker and f"chat_message.content/{victim}" in marker
    by_user = report(out)
    assert by_user[alice]["complete"] is False and by_user[bob]["complete"] is True
    assert {(f["table"], f["column"], f["row_id"]) for f in by_user[alice]["failures"]} == {
        ("chat", "title", tampered), ("chat_message", "content", victim)}
    assert json.loads((out / REPORT).read_text())["complete"] is False


def test_a_user_whose_wrapped_key_is_gone_is_reported(restored, world, tmp_path):
    alice, bob = world.users
    with psycopg.connect(restored) as conn:
        conn.execute('UPDATE public."user" SET kms_encrypted_dek = NULL WHERE id = %s', (bob,))
    out = tmp_path / "out"
    result = owui_crypto("recover", "--out", out, "--all", "--database-url", restored, "--no-progress")
    assert result.returncode == 1
    assert f"user {bob}: INCOMPLETE" in result.stdout and "kms_encrypted_dek" in result.stdout
    assert load(out / f"{bob}.json") == []
    by_user = report(out)
    assert "kms_encrypted_dek" in by_user[bob]["key_unavailable"]
    assert len(by_user[bob]["failures"]) == 3 * 3 + 9  # title, chat, summary of 3 chats; 9 messages
    assert by_user[alice]["complete"] is True
    assert_export_matches(out, world, alice)
    unknown = owui_crypto("recover", "--out", out, "--user", "nobody", "--database-url", restored, "--no-progress")
    assert unknown.returncode == 1 and "no user nobody in this database" in unknown.stdout


def test_open_row_matches_the_sql_semantics():
    """Plaintext from before install passes through; a value of another key or a damaged one never opens."""
    dek = os.urandom(32)
    key = Key(SecretBytes(dek), userkeys.key_id(dek))
    schema = Schema({"chat": ("id", "title", "chat", "summary")}, {"chat": frozenset({"chat"})})

    def sealed(column: str, text: str, master: bytes = dek, row: str = "c1") -> str:
        return envelope.seal(master, userkeys.key_id(master), envelope.binding("chat", column, row), text)

    doc = json.dumps({"title": AWKWARD, "history": {"messages": {}}}, ensure_ascii=False)
    failures: list = []
    row = {"id": "c1", "title": sealed("title", AWKWARD), "chat": json.dumps(sealed("chat", doc)), "summary": None}
    assert open_row("chat", row, key, schema, failures) == {"id": "c1", "title": AWKWARD, "chat": json.loads(doc),
                                                           "summary": None}
    plain = {"id": "c1", "title": "before install", "chat": '{"a": 1}', "summary": "s"}
    assert open_row("chat", plain, key, schema, failures) == {"id": "c1", "title": "before install",
                                                             "chat": {"a": 1}, "summary": "s"}
    assert failures == []
    other = os.urandom(32)
    bad = {"id": "c1", "title": sealed("title", "x", master=other), "chat": json.dumps(sealed("chat", doc, row="c2")),
           "summary": "oc1:nonsense"}
    assert open_row("chat", bad, key, schema, failures) is None
    assert [(f.column, f.no_key) for f in failures] == [("title", False), ("chat", False), ("summary", False)]
    assert "not" in failures[0].reason and userkeys.key_id(other) in failures[0].reason
    failures.clear()
    assert open_row("chat", row, Key.unavailable("gone"), schema, failures) is None
    assert all(f.no_key and "gone" in f.reason for f in failures)


def test_file_names_never_leave_the_output_directory():
    uid = str(uuid.uuid4())
    assert file_stem(uid) == uid and file_stem("alice-1@example.com") == "alice-1@example.com"
    for hostile in ("../../etc/cron.d/x", "/abs", ".hidden", "..", "a/b", "x" * 300, "tab\tname"):
        stem = file_stem(hostile)
        assert stem.startswith("user-") and "/" not in stem and len(stem) == 29
