"""The real Open WebUI 0.12.4 behind ``owui-crypto serve``, seen through its API and, directly, in PostgreSQL.

The tests run in file order and share one server, two users and their chats
(module fixtures); destructive steps (deleting a chat, deleting a user) come last.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from app_adapter import errors
from app_adapter.config import Settings
from app_adapter.keys import KeyService
from app_adapter.kms import KmsKeys
from e2e.conftest import TIMINGS, Owui
from e2e.llm_stub import MODEL
from e2e.owui_api import Chat, User, add_user, chat_document, message_texts, new_chat, ok, signup, tokens, words
from tests.serverlog import LogWindow, key_forms

PLACEHOLDER_TITLE = "[encrypted]"

# The memo's Phase 4 verification queries, verbatim.
MEMO_QUERY_1 = """SELECT email, kms_encrypted_dek IS NOT NULL as has_kms_backup, user_encrypted_dek IS NOT NULL as has_user_dek FROM "user" WHERE email = 'test@example.com';"""  # noqa: E501
MEMO_QUERY_2 = """SELECT COUNT(DISTINCT user_encrypted_dek) as unique_user_deks, COUNT(DISTINCT kms_encrypted_dek) as unique_kms_deks, COUNT(*) as total_users FROM "user" WHERE user_encrypted_dek IS NOT NULL;"""  # noqa: E501


@dataclass
class World:
    owui: Owui
    alice: User  # the first sign-up: admin
    bob: User  # added by the admin
    written: list[str] = field(default_factory=list)  # every title and message text sent to Open WebUI
    deks: dict[str, bytes] = field(default_factory=dict)  # user id (or 'share') -> key, for the log check

    def client(self, user: User | None = None, **kw) -> httpx.Client:
        return self.owui.client(user.token if user else None, **kw)

    def chat(self, user: User, label: str, n: int = 4) -> Chat:
        with self.client(user) as c:
            chat = new_chat(c, user, label, n)
        self.written += chat.secrets()
        return chat


def no_secrets(text: str, secrets: list[str], where: str) -> None:
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"{where} shows text it must not: {leaked[:3]}"
    parts = {t for s in secrets for t in tokens(s)}  # the random parts alone
    leaked = [t for t in parts if t in text]
    assert not leaked, f"{where} shows parts of text it must not: {leaked[:3]}"


def no_ciphertext(text: str, where: str) -> None:
    assert "oc1:" not in text and "gAAAAA" not in text, f"{where} shows ciphertext"


@pytest.fixture(scope="module")
def world(owui: Owui) -> World:
    with owui.client() as anonymous:
        started = time.monotonic()
        alice = signup(anonymous, "Alice Admin", "test@example.com", "alice-Pw-12345")
        TIMINGS["signup_s"] = time.monotonic() - started
        with owui.client(alice.token) as admin:
            bob = add_user(admin, "Bob User", "bob@example.com", "bob-Pw-123456", anonymous)
    w = World(owui, alice, bob)
    for user in (alice, bob):
        for i in range(3):
            w.chat(user, f"{user.name.split()[0].lower()} chat {i}", n=4)
    service = KeyService(Settings.from_env(), owui.database_url)
    w.deks = {alice.id: service.dek(alice.id).reveal(), bob.id: service.dek(bob.id).reveal(),
              "share": service.share_key().reveal()}
    service.kms.close()
    return w


def test_started_with_every_hook_installed(owui: Owui) -> None:
    log = owui.log()
    assert "changed where owui-crypto hooks in" not in log
    assert "hooked: engines 2, dependencies 2 (in " in log
    assert "owui-crypto: hooks installed" in log
    sockets = int(log.split("socket.io handlers ", 1)[1].split(",", 1)[0])
    assert sockets >= 10  # every handler but connect/disconnect (socket/main.py)


# -- memo Phase 4 and user ids -------------------------------------------------------------


def test_phase4_signup_has_kms_backup_and_one_dek_per_user(world: World) -> None:
    assert world.alice.role == "admin" and world.bob.role == "user"
    # A KMS backup for every user; no user-held copy, since no user-held secret is configured (a copy
    # wrapped under the user id, as the memo's interim plan had it, would open for anyone with a dump).
    assert world.owui.sql(MEMO_QUERY_1) == [("test@example.com", True, False)]
    assert world.owui.sql(MEMO_QUERY_2) == [(0, 0, 0)]
    assert world.owui.sql('SELECT count(*), count(DISTINCT kms_encrypted_dek) FROM "user"'
                          " WHERE salt IS NULL AND user_key IS NULL") == [(2, 2)]


def test_user_ids_are_the_kms_hmac_of_the_email(world: World) -> None:
    with KmsKeys(Settings.from_env()) as kms:
        assert world.alice.id == kms.user_id("test@example.com")
        assert world.bob.id == kms.user_id("bob@example.com")
    registered = dict(world.owui.sql("SELECT user_id, key_id FROM owui_crypto.user_key"))
    assert set(registered) == {world.alice.id, world.bob.id}
    assert len(set(registered.values())) == 2


# -- each user's own chats ---------------------------------------------------------------


def test_owner_lists_and_gets_their_chats_in_plaintext(world: World) -> None:
    for user in (world.alice, world.bob):
        with world.client(user) as c:
            listed = {row["id"]: row["title"] for row in ok(c.get("/api/v1/chats/list")).json()}
            assert listed == {chat.id: chat.title for chat in user.chats}
            for chat in user.chats:
                body = ok(c.get(f"/api/v1/chats/{chat.id}")).json()
                assert body["title"] == chat.title and body["chat"]["title"] == chat.title
                assert message_texts(body["chat"]) == sorted(chat.texts)
    # In the database: every title, chat document and message is sealed, under its owner's key.
    rows = world.owui.sql("SELECT c.user_id, substr(c.title, 5, 16), substr(c.chat::text, 6, 16), k.key_id "
                          "FROM public.chat c JOIN owui_crypto.user_key k ON k.user_id = c.user_id")
    assert len(rows) == 6 and all(title_key == chat_key == key_id for _, title_key, chat_key, key_id in rows)
    assert world.owui.sql("SELECT count(*), bool_and(content::text LIKE '\"oc1:%') FROM public.chat_message") == [
        (24, True)]


def test_rename_pin_tag_archive(world: World) -> None:
    alice, chat, other = world.alice, world.alice.chats[0], world.alice.chats[1]
    renamed = words("renamed alice title")
    world.written.append(renamed)
    with world.client(alice) as c:
        body = ok(c.post(f"/api/v1/chats/{chat.id}", json={"chat": {"title": renamed}})).json()
        assert body["title"] == renamed
        chat.title = renamed
        assert ok(c.get(f"/api/v1/chats/{chat.id}")).json()["chat"]["title"] == renamed
        assert message_texts(ok(c.get(f"/api/v1/chats/{chat.id}")).json()["chat"]) == sorted(chat.texts)

        assert ok(c.post(f"/api/v1/chats/{chat.id}/pin")).json()["pinned"] is True
        assert [r["title"] for r in ok(c.get("/api/v1/chats/pinned")).json()] == [renamed]

        tags = ok(c.post(f"/api/v1/chats/{chat.id}/tags", json={"name": "e2e-tag"})).json()
        assert [t["name"] for t in tags] == ["e2e-tag"]
        by_tag = ok(c.post("/api/v1/chats/tags", json={"name": "e2e-tag"})).json()
        assert [(r["id"], r["title"]) for r in by_tag] == [(chat.id, renamed)]

        assert ok(c.post(f"/api/v1/chats/{other.id}/archive")).json()["archived"] is True
        archived = ok(c.get("/api/v1/chats/archived")).json()
        assert [(r["id"], r["title"]) for r in archived] == [(other.id, other.title)]
        assert [r["id"] for r in ok(c.get("/api/v1/chats/all/archived")).json()] == [other.id]
        assert other.id not in {r["id"] for r in ok(c.get("/api/v1/chats/list")).json()}
    (sealed,) = world.owui.sql("SELECT title FROM public.chat WHERE id = %s", (chat.id,))[0]
    assert sealed.startswith("oc1:") and renamed not in sealed


def test_search_by_title_and_by_message_text(world: World) -> None:
    for user in (world.alice, world.bob):
        chat = user.chats[2]
        title_word = tokens(chat.title)[0]  # a random part of the title
        text_word = tokens(chat.texts[1])[0]  # a random part of an assistant message
        with world.client(user) as c:
            assert [r["id"] for r in ok(c.get("/api/v1/chats/search", params={"text": title_word})).json()] == [chat.id]
            found = ok(c.get("/api/v1/chats/search", params={"text": text_word})).json()
            assert [r["id"] for r in found] == [chat.id]
            assert found[0]["title"] == chat.title


def test_share_read_by_owner_grantee_and_anonymous(world: World) -> None:
    alice, bob, chat = world.alice, world.bob, world.alice.chats[2]
    with world.client(alice) as c:
        share_id = ok(c.post(f"/api/v1/chats/{chat.id}/share")).json()["share_id"]
        assert share_id
        shared = ok(c.get(f"/api/v1/chats/share/{share_id}")).json()
        assert shared["title"] == chat.title and message_texts(shared["chat"]) == sorted(chat.texts)
        assert [r["title"] for r in ok(c.get("/api/v1/chats/shared")).json()] == [chat.title]
    # The snapshot is sealed under the deployment's share key, not Alice's.
    ((title, doc),) = world.owui.sql("SELECT title, chat::text FROM public.shared_chat WHERE id = %s", (share_id,))
    share_key_id = world.owui.sql("SELECT key_id FROM owui_crypto.deployment_key WHERE name = 'share'")[0][0]
    assert title.startswith(f"oc1:{share_key_id}:") and doc.startswith(f'"oc1:{share_key_id}:')
    no_secrets(title + doc, chat.secrets(), "shared_chat in the database")

    with world.client(bob) as c:  # not granted yet
        denied = c.get(f"/api/v1/chats/share/{share_id}")
        assert denied.status_code == 401
        no_secrets(denied.text, chat.secrets(), "a share Bob may not read")
    with world.client() as anonymous:
        denied = anonymous.get(f"/api/v1/chats/share/{share_id}")
        assert denied.status_code == 401
        no_secrets(denied.text, chat.secrets(), "a share anonymous may not read")

    grants = [{"principal_type": "user", "principal_id": bob.id, "permission": "read"},
              {"principal_type": "anyone", "principal_id": "*", "permission": "read"}]
    with world.client(alice) as c:
        ok(c.post(f"/api/v1/chats/shared/{chat.id}/access/update", json={"access_grants": grants}))
    for reader in (world.client(bob), world.client()):
        with reader as c:
            body = ok(c.get(f"/api/v1/chats/share/{share_id}")).json()
            assert body["title"] == chat.title and message_texts(body["chat"]) == sorted(chat.texts)
            assert body["chat"]["share_mode"] is None


def test_continue_share_shows_grantee_placeholders_and_refuses_their_writes(world: World) -> None:
    """share_mode='continue' gives the grantee the *live* chat, which is sealed under the owner's key."""
    alice, bob, chat = world.alice, world.bob, world.alice.chats[2]
    grants = [{"principal_type": "user", "principal_id": bob.id, "permission": "read"},
              {"principal_type": "anyone", "principal_id": "*", "permission": "read"}]
    with world.client(alice) as c:
        share_id = ok(c.get(f"/api/v1/chats/{chat.id}")).json()["share_id"]
        ok(c.post(f"/api/v1/chats/shared/{chat.id}/access/update",
                  json={"access_grants": grants, "share_mode": "continue"}))
    with world.client(bob) as c:
        live = c.get(f"/api/v1/chats/share/{share_id}")
        assert live.status_code == 200, live.text
        assert live.json()["chat"]["share_mode"] == "continue"
        assert live.json()["title"] == PLACEHOLDER_TITLE
        no_secrets(live.text, chat.secrets(), "a continue share read by its grantee")
        no_ciphertext(live.text, "a continue share read by its grantee")
    with world.client() as anonymous:  # anonymous readers still get the snapshot
        body = ok(anonymous.get(f"/api/v1/chats/share/{share_id}")).json()
        assert body["title"] == chat.title
    with world.client(alice) as c:  # back to a plain snapshot share
        ok(c.post(f"/api/v1/chats/shared/{chat.id}/access/update", json={"access_grants": grants, "share_mode": None}))


def test_export_and_import(world: World) -> None:
    alice = world.alice
    with world.client(alice) as c:
        exported = [json.loads(line) for line in ok(c.get("/api/v1/chats/all")).text.splitlines() if line.strip()]
        assert {e["id"]: e["title"] for e in exported} == {chat.id: chat.title for chat in alice.chats}
        for entry in exported:
            chat = next(ch for ch in alice.chats if ch.id == entry["id"])
            assert message_texts(entry["chat"]) == sorted(chat.texts)
        no_ciphertext(json.dumps(exported), "the export")

        title = words("imported alice title")
        texts = [words(f"imported alice message {i}") for i in range(3)]
        world.written += [title, *texts]
        imported = ok(c.post("/api/v1/chats/import", json={"chats": [
            {"chat": chat_document(title, texts), "meta": {}, "pinned": False, "folder_id": None}]})).json()
        assert len(imported) == 1 and imported[0]["title"] == title
        chat = Chat(imported[0]["id"], title, texts, alice.id)
        alice.chats.append(chat)
        body = ok(c.get(f"/api/v1/chats/{chat.id}")).json()
        assert body["title"] == title and message_texts(body["chat"]) == sorted(texts)
    rows = world.owui.sql("SELECT title, chat::text FROM public.chat WHERE id = %s", (chat.id,))
    assert rows and rows[0][0].startswith("oc1:") and rows[0][1].startswith('"oc1:')


def test_upsert_messages_self_heals_through_the_base_table(world: World) -> None:
    """ChatMessages.upsert_messages (INSERT ... ON CONFLICT DO NOTHING) backfills chat_message rows."""
    alice, chat = world.alice, world.alice.chats[1]
    world.owui.sql("DELETE FROM public.chat_message WHERE chat_id = %s", (chat.id,))
    with world.client(alice) as c:
        fork = ok(c.post(f"/api/v1/chats/{chat.id}/fork", json={})).json()  # reads the messages map: backfills
        assert message_texts(fork["chat"]) == sorted(chat.texts)
        ok(c.delete(f"/api/v1/chats/{fork['id']}"))
        clone = ok(c.post(f"/api/v1/chats/{chat.id}/clone", json={})).json()
        assert clone["title"] == f"Clone of {chat.title}" and message_texts(clone["chat"]) == sorted(chat.texts)
        ok(c.delete(f"/api/v1/chats/{clone['id']}"))
    rows = world.owui.sql("SELECT content::text FROM public.chat_message WHERE chat_id = %s", (chat.id,))
    assert len(rows) == len(chat.texts), "the backfill did not write the missing rows"
    assert all(r[0].startswith('"oc1:') for r in rows)
    assert "Backfill failed" not in world.owui.log()


def send(c: httpx.Client, text: str, chat_id: str | None = None, parent_id: str | None = None) -> httpx.Response:
    """What the web client posts to chat with a model; the reply is written by a background task."""
    user_id, reply_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": text}], "parent_id": parent_id,
            "id": reply_id, "session_id": "e2e-session",
            "user_message": {"id": user_id, "parentId": parent_id, "childrenIds": [reply_id], "role": "user",
                             "content": text, "timestamp": int(time.time())}}
    if chat_id:
        body["chat_id"] = chat_id
    response = c.post("/api/chat/completions", json=body)
    response.reply_id = reply_id  # type: ignore[attr-defined]
    return response


def wait_for_reply(c: httpx.Client, chat_id: str, reply_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = ok(c.get(f"/api/v1/chats/{chat_id}")).json()["chat"]["history"]["messages"].get(reply_id) or {}
        if message.get("done"):
            return message
        time.sleep(0.2)
    raise AssertionError(f"no finished reply {reply_id} in chat {chat_id}")


def test_chatting_with_a_model_seals_what_the_background_task_writes(world: World) -> None:
    """POST /api/chat/completions answers at once; the model's reply is streamed and saved by a task the request
    spawned, which must still act as the chat's owner. Two turns: a new chat, then a follow-up."""
    for user in (world.alice, world.bob):
        who = user.name.split()[0].lower()
        asked = [words(f"{who} asks"), words(f"{who} asks again")]
        with world.client(user) as c:
            first = ok(send(c, asked[0]))
            chat_id = first.json()["chat_id"]
            assert first.json()["task_ids"], first.text
            reply = wait_for_reply(c, chat_id, first.reply_id)  # type: ignore[attr-defined]
            assert reply["content"].strip() == f"echo: {asked[0]}"
            second = ok(send(c, asked[1], chat_id=chat_id, parent_id=first.reply_id))  # type: ignore[attr-defined]
            reply = wait_for_reply(c, chat_id, second.reply_id)  # type: ignore[attr-defined]
            assert reply["content"].strip() == f"echo: {asked[1]}"
            title = words(f"{who} model chat title")
            ok(c.post(f"/api/v1/chats/{chat_id}", json={"chat": {"title": title}}))
            texts = [asked[0], f"echo: {asked[0]}", asked[1], f"echo: {asked[1]}"]
            body = ok(c.get(f"/api/v1/chats/{chat_id}")).json()
            assert body["title"] == title
            assert [t.strip() for t in message_texts(body["chat"])] == sorted(texts)
        user.chats.append(Chat(chat_id, title, texts, user.id))
        world.written += [title, *texts]
        rows = world.owui.sql("SELECT role, content::text FROM public.chat_message WHERE chat_id = %s", (chat_id,))
        assert sorted(r[0] for r in rows) == ["assistant", "assistant", "user", "user"]
        assert all(r[1].startswith('"oc1:') for r in rows), rows
        ((doc,),) = world.owui.sql("SELECT chat::text FROM public.chat WHERE id = %s", (chat_id,))
        assert doc.startswith('"oc1:')


def test_a_continue_share_grantee_cannot_write_into_the_owners_chat(world: World) -> None:
    """Open WebUI lets a 'continue' grantee send messages into the owner's live chat; that needs the owner's key."""
    alice, bob, chat = world.alice, world.bob, world.alice.chats[-1]
    grants = [{"principal_type": "user", "principal_id": bob.id, "permission": "read"}]
    with world.client(alice) as c:
        ok(c.post(f"/api/v1/chats/{chat.id}/share", json={"share_mode": "continue"}))
        ok(c.post(f"/api/v1/chats/shared/{chat.id}/access/update", json={"access_grants": grants,
                                                                          "share_mode": "continue"}))
        last = ok(c.get(f"/api/v1/chats/{chat.id}")).json()["chat"]["history"]["currentId"]
    with world.client(bob) as c:
        # What the web client sends: a reply to the last message. Bob's view of the live chat has no messages
        # (placeholders), so Open WebUI itself refuses before writing.
        stale = send(c, words("bob butts in"), chat_id=chat.id, parent_id=last)
        assert stale.status_code == 409 and "Parent message" in stale.text, stale.text
        # A turn without a parent gets as far as the database, which refuses it: Bob does not hold Alice's key.
        refused = send(c, words("bob butts in again"), chat_id=chat.id, parent_id=None)
    assert refused.status_code == 403, refused.text
    assert refused.json()["owui_crypto"] == errors.NotOwner.sqlstate
    for r in (stale, refused):
        no_secrets(r.text, chat.secrets(), "the refusal")
        no_ciphertext(r.text, "the refusal")
    with world.client(alice) as c:
        body = ok(c.get(f"/api/v1/chats/{chat.id}")).json()
        assert [t.strip() for t in message_texts(body["chat"])] == sorted(chat.texts)
        ok(c.delete(f"/api/v1/chats/{chat.id}/share"))


def test_database_dump_has_no_plaintext_while_the_api_shows_it(world: World) -> None:
    dump = subprocess.run(["pg_dump", "--no-owner", world.owui.database_url], capture_output=True, text=True,
                          check=True).stdout
    assert "test@example.com" in dump and "oc1:" in dump  # a real dump of this database
    no_secrets(dump, world.written, "pg_dump")
    for user in (world.alice, world.bob):  # ...while each owner still reads everything
        with world.client(user) as c:
            for chat in user.chats:
                body = ok(c.get(f"/api/v1/chats/{chat.id}")).json()
                assert body["title"] == chat.title and message_texts(body["chat"]) == sorted(chat.texts)


# -- isolation ----------------------------------------------------------------------------


def test_other_user_gets_no_plaintext_of_alices_chats(world: World) -> None:
    alice, bob = world.alice, world.bob
    secrets = [s for chat in alice.chats for s in chat.secrets()]
    with world.client(bob) as c:
        responses = [c.get("/api/v1/chats/list"), c.get("/api/v1/chats/all"), c.get("/api/v1/chats/pinned"),
                     c.get("/api/v1/chats/archived"), c.get("/api/v1/chats/all/archived"),
                     c.get("/api/v1/chats/shared"), c.get("/api/v1/chats/all/tags"),
                     c.post("/api/v1/chats/tags", json={"name": "e2e-tag"}),
                     c.get("/api/v1/chats/all/db"), c.get(f"/api/v1/chats/list/user/{alice.id}")]
        for chat in alice.chats:
            responses += [
                c.get("/api/v1/chats/search", params={"text": tokens(chat.title)[0]}),
                c.get("/api/v1/chats/search", params={"text": tokens(chat.texts[0])[0]}),
                c.get(f"/api/v1/chats/{chat.id}"), c.get(f"/api/v1/chats/{chat.id}/pinned"),
                c.get(f"/api/v1/chats/{chat.id}/tags"), c.get(f"/api/v1/chats/stats/export/{chat.id}"),
                c.post(f"/api/v1/chats/{chat.id}/clone", json={}), c.post(f"/api/v1/chats/{chat.id}/fork", json={}),
                c.post(f"/api/v1/chats/{chat.id}/pin"), c.post(f"/api/v1/chats/{chat.id}/archive"),
                c.post(f"/api/v1/chats/{chat.id}/share"), c.get(f"/api/v1/chats/shared/{chat.id}/access"),
                c.post(f"/api/v1/chats/{chat.id}", json={"chat": {"title": "taken over"}}),
            ]
        for r in responses:
            where = f"Bob's {r.request.method} {r.request.url.path}"
            assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:300]}"
            no_secrets(r.text, secrets, where)
            no_ciphertext(r.text, where)
        assert {row["id"] for row in ok(c.get("/api/v1/chats/list")).json()} == {ch.id for ch in bob.chats}
    with world.client(alice) as c:  # nothing of Alice's changed
        for chat in alice.chats:
            assert ok(c.get(f"/api/v1/chats/{chat.id}")).json()["title"] == chat.title


def test_admin_reads_other_users_chats_as_placeholders_with_200(world: World) -> None:
    alice, bob = world.alice, world.bob
    secrets = [s for chat in bob.chats for s in chat.secrets()]
    with world.client(alice) as admin:
        listing = ok(admin.get(f"/api/v1/chats/list/user/{bob.id}"))
        assert {r["id"] for r in listing.json()} == {chat.id for chat in bob.chats}
        assert {r["title"] for r in listing.json()} == {PLACEHOLDER_TITLE}
        searched = ok(admin.get(f"/api/v1/chats/list/user/{bob.id}", params={"query": tokens(bob.chats[0].title)[0]}))
        exported = ok(admin.get("/api/v1/chats/all/db"))
        by_id = {e["id"]: e for e in exported.json()}
        assert {chat.id for chat in alice.chats + bob.chats} <= set(by_id)
        assert all(by_id[chat.id]["title"] == chat.title for chat in alice.chats)
        assert all(by_id[chat.id]["title"] == PLACEHOLDER_TITLE for chat in bob.chats)
        assert all(by_id[chat.id]["chat"].get("encrypted") is True for chat in bob.chats)
        one = ok(admin.get(f"/api/v1/chats/{bob.chats[0].id}"))
        assert one.json()["title"] == PLACEHOLDER_TITLE
        direct = ok(admin.get(f"/api/v1/chats/share/{bob.chats[0].id}"))  # admin fallback: chat id as share id
        fork = admin.post(f"/api/v1/chats/{bob.chats[0].id}/fork", json={})  # an admin-owned copy of placeholders
        assert fork.status_code < 500, fork.text
        if fork.status_code == 200:
            ok(admin.delete(f"/api/v1/chats/{fork.json()['id']}"))
        for r in (listing, searched, exported, one, direct, fork):
            where = f"admin {r.request.method} {r.request.url.path}"
            no_secrets(r.text, secrets, where)
            no_ciphertext(r.text, where)


def test_a_write_that_needs_another_users_key_is_refused_with_403(world: World) -> None:
    """Open WebUI lets an admin edit any user's message (ENABLE_ADMIN_CHAT_ACCESS); it would need Bob's key."""
    alice, bob, chat = world.alice, world.bob, world.bob.chats[0]
    with world.client(bob) as c:
        message_id = next(iter(ok(c.get(f"/api/v1/chats/{chat.id}")).json()["chat"]["history"]["messages"]))
    with world.client(alice) as admin:
        refused = admin.post(f"/api/v1/chats/{chat.id}/messages/{message_id}", json={"content": "admin was here"})
    assert refused.status_code == 403, refused.text
    assert refused.json()["owui_crypto"] == errors.NotOwner.sqlstate
    assert "another user" in refused.json()["detail"]
    with world.client(bob) as c:  # Bob's chat is intact: no placeholder was written back
        body = ok(c.get(f"/api/v1/chats/{chat.id}")).json()
        assert body["title"] == chat.title and message_texts(body["chat"]) == sorted(chat.texts)


def test_shared_folder_members_read_placeholders_and_cannot_write(world: World) -> None:
    alice, bob, chat = world.alice, world.bob, world.alice.chats[2]
    with world.client(alice) as c:
        folder = ok(c.post("/api/v1/folders/", json={"name": "team folder"})).json()
        ok(c.post(f"/api/v1/chats/{chat.id}/folder", json={"folder_id": folder["id"]}))
        ok(c.post(f"/api/v1/folders/{folder['id']}/access/update", json={
            "access_grants": [{"principal_type": "user", "principal_id": bob.id, "permission": "read"},
                              {"principal_type": "user", "principal_id": bob.id, "permission": "write"}],
            "share_mode": "continue"}))
    with world.client(bob) as c:
        listed = ok(c.get(f"/api/v1/folders/{folder['id']}/shared/chats"))
        assert [(r["id"], r["title"], r["readonly"]) for r in listed.json()["chats"]] == [
            (chat.id, PLACEHOLDER_TITLE, True)]
        read = ok(c.get(f"/api/v1/chats/{chat.id}"))
        assert read.json()["title"] == PLACEHOLDER_TITLE
        rename = c.post(f"/api/v1/chats/{chat.id}", json={"chat": {"title": "renamed by bob"}})
        assert rename.status_code in (401, 403), rename.text
        for r in (listed, read, rename):
            where = f"Bob's {r.request.method} {r.request.url.path} (shared folder)"
            no_secrets(r.text, chat.secrets(), where)
            no_ciphertext(r.text, where)
    with world.client(alice) as c:
        assert ok(c.get(f"/api/v1/chats/{chat.id}")).json()["title"] == chat.title
        ok(c.post(f"/api/v1/chats/{chat.id}/folder", json={"folder_id": None}))
        ok(c.delete(f"/api/v1/folders/{folder['id']}"))


def test_admin_changing_a_continue_share_keeps_the_owners_snapshot(world: World) -> None:
    """Only a chat's owner may write its share (policy: shared_chat's owner is the chat's owner): an admin,
    who reads placeholders, is refused instead of snapshotting them over the share."""
    alice, bob, chat = world.alice, world.bob, world.bob.chats[1]
    with world.client(bob) as c:
        share_id = ok(c.post(f"/api/v1/chats/{chat.id}/share", json={"share_mode": "continue"})).json()["share_id"]
    with world.client(alice) as admin:
        refused = admin.post(f"/api/v1/chats/shared/{chat.id}/access/update",
                             json={"access_grants": [], "share_mode": None})
    assert refused.status_code in (403, 409), refused.text
    with world.client(bob) as c:
        assert ok(c.get(f"/api/v1/chats/share/{share_id}")).json()["title"] == chat.title


def test_cookie_and_api_key_callers_act_as_themselves(world: World) -> None:
    alice = world.alice
    with world.client(alice) as c:  # Bearer JWT
        expected = {r["id"]: r["title"] for r in ok(c.get("/api/v1/chats/list")).json()}
        api_key = ok(c.post("/api/v1/auths/api_key")).json()["api_key"]
    assert expected and set(expected.values()) <= {chat.title for chat in alice.chats}
    assert api_key.startswith("sk-")
    with httpx.Client(base_url=world.owui.base_url, cookies={"token": alice.token}, timeout=60) as c:
        assert {r["id"]: r["title"] for r in ok(c.get("/api/v1/chats/list")).json()} == expected
    with world.owui.client(api_key) as c:
        assert {r["id"]: r["title"] for r in ok(c.get("/api/v1/chats/list")).json()} == expected
        assert ok(c.get(f"/api/v1/chats/{alice.chats[0].id}")).json()["title"] == alice.chats[0].title
    with httpx.Client(base_url=world.owui.base_url, headers={"x-api-key": api_key}, timeout=60) as c:
        assert {r["id"]: r["title"] for r in ok(c.get("/api/v1/chats/list")).json()} == expected


def test_request_latency_with_encryption(world: World) -> None:
    """Median wall time of common reads by the owner (printed at the end; not a pass/fail threshold)."""
    alice, chat = world.alice, world.alice.chats[0]
    word = tokens(chat.texts[1])[0]
    with world.client(alice) as c:
        for name, call in (("get_chat_ms", lambda: c.get(f"/api/v1/chats/{chat.id}")),
                           ("list_chats_ms", lambda: c.get("/api/v1/chats/list")),
                           ("search_ms", lambda: c.get("/api/v1/chats/search", params={"text": word}))):
            ok(call())
            samples = []
            for _ in range(30):
                started = time.perf_counter()
                ok(call())
                samples.append((time.perf_counter() - started) * 1000)
            TIMINGS[name] = sorted(samples)[len(samples) // 2]


# -- deleting -------------------------------------------------------------------------------


def test_delete_chat(world: World) -> None:
    bob, chat = world.bob, world.bob.chats.pop()
    with world.client(bob) as c:
        assert ok(c.delete(f"/api/v1/chats/{chat.id}")).json() is True
        assert c.get(f"/api/v1/chats/{chat.id}").status_code == 401
    assert world.owui.sql("SELECT count(*) FROM public.chat_message WHERE chat_id = %s", (chat.id,)) == [(0,)]


def test_user_deletion_crypto_shreds(world: World) -> None:
    alice, bob = world.alice, world.bob
    before = world.owui.sql("SELECT key_id FROM owui_crypto.user_key WHERE user_id = %s", (bob.id,))
    assert before
    with world.client(alice) as admin:
        assert ok(admin.delete(f"/api/v1/users/{bob.id}")).json() is True
    assert world.owui.sql('SELECT count(*) FROM "user" WHERE id = %s', (bob.id,)) == [(0,)]
    assert world.owui.sql("SELECT count(*) FROM owui_crypto.user_key WHERE user_id = %s", (bob.id,)) == [(0,)]
    assert world.owui.sql("SELECT count(*) FROM public.chat WHERE user_id = %s", (bob.id,)) == [(0,)]
    with world.client(bob) as c:
        assert c.get("/api/v1/chats/list").status_code == 401
    service = KeyService(Settings.from_env(), world.owui.database_url)  # a fresh process: empty cache
    with pytest.raises(errors.NotProvisioned):
        service.dek(bob.id)
    # The same email signs up again: same id (KMS HMAC), a new key; nothing sealed before opens with it.
    with world.client(alice) as admin, world.client() as anonymous:
        again = add_user(admin, "Bob Again", "bob@example.com", "bob-Pw-654321", anonymous)
    assert again.id == bob.id
    after = world.owui.sql("SELECT key_id FROM owui_crypto.user_key WHERE user_id = %s", (bob.id,))
    assert after and after != before
    assert world.owui.sql('SELECT count(DISTINCT kms_encrypted_dek) FROM "user"') == [(2,)]
    service.kms.close()


# -- beyond chats: written through Open WebUI's own API ---------------------------------------


def test_prompts_automations_and_events_are_sealed_and_read_back(world: World) -> None:
    """The tables the browser test does not reach: a prompt (and its history), an automation, a calendar event.
    Their words go into `world.written`, so the dump and the server log checks below look for them too."""
    alice = world.alice
    prompt, automation, event = words("prompt text"), words("automation prompt"), words("event title")
    place, note = words("event place"), words("event note")
    world.written += [prompt, automation, event, place, note]
    with world.client(alice) as c:
        command = f"/canary{secrets.token_hex(4)}"  # the command is plaintext by decision: no canary in it
        made = ok(c.post("/api/v1/prompts/create", json={"command": command, "name": "canary prompt",
                                                           "content": prompt})).json()
        flow = ok(c.post("/api/v1/automations/create", json={
            "name": "canary automation",
            "data": {"prompt": automation, "model_id": "e2e-stub-model", "rrule": "FREQ=DAILY"}})).json()
        calendars = ok(c.get("/api/v1/calendars/")).json()
        calendar_id = calendars[0]["id"] if calendars else ok(c.post("/api/v1/calendars/create", json={
            "name": "canary calendar"})).json()["id"]
        made_event = ok(c.post("/api/v1/calendars/events/create", json={
            "calendar_id": calendar_id, "title": event, "description": note, "location": place,
            "start_at": int(time.time()) * 1_000_000_000})).json()
        assert ok(c.get(f"/api/v1/prompts/id/{made['id']}")).json()["content"] == prompt
        assert ok(c.get(f"/api/v1/automations/{flow['id']}")).json()["data"]["prompt"] == automation
        assert made_event["title"] == event and made_event["location"] == place
    raw = world.owui.sql("SELECT p.content || ph.snapshot::text || a.data::text || e.title || e.location"
                         " FROM public.prompt p JOIN public.prompt_history ph ON ph.prompt_id = p.id,"
                         " public.automation a, public.calendar_event e"
                         " WHERE p.id = %s AND a.id = %s AND e.id = %s", (made["id"], flow["id"], made_event["id"]))
    assert raw and "oc1:" in raw[0][0]
    dump = subprocess.run(["pg_dump", "--no-owner", world.owui.database_url], capture_output=True, text=True,
                          check=True).stdout
    no_secrets(dump, [prompt, automation, event, place, note], "pg_dump")


# -- the server log (last: it covers everything above) ------------------------------------------


def test_server_log_has_no_key_and_no_chat_text(world: World, pg_log: LogWindow) -> None:
    log = pg_log.read()
    ours = [line for line in log.splitlines() if world.owui.database in line]
    assert any("owui_crypto.activate" in line for line in ours), "log_statement=all did not log this database"
    assert any("INSERT INTO chat_message" in line or "INSERT INTO public.chat_message" in line for line in ours)
    for name, key in world.deks.items():
        for form in key_forms(key):
            assert form not in log, f"a key ({name}) is in the PostgreSQL log"
            assert form not in world.owui.log(), f"a key ({name}) is in Open WebUI's log"
    no_secrets(log, world.written, "the PostgreSQL server log")
