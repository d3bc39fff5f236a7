"""Sealing and opening through the views: isolation, fail-closed, binding, fidelity."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Json

from app_adapter import envelope
from tests.owui import insert_chat, raw

PLACEHOLDER_CHAT = {"title": "[encrypted]", "history": {"messages": {}, "currentId": None}, "messages": [],
                    "encrypted": True}


def sqlstate_of(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.sqlstate


def test_owner_reads_plaintext_and_base_holds_only_envelopes(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "Hiking in Zermatt", [("user", "Which trail to Gornergrat?"),
                                                            ("assistant", "Take the Riffelsee path.")])
    title, doc, summary = app.execute("SELECT title, chat, summary FROM chat WHERE id = %s", (chat_id,)).fetchone()
    assert title == "Hiking in Zermatt"
    assert [m["content"] for m in doc["messages"]] == ["Which trail to Gornergrat?", "Take the Riffelsee path."]
    assert summary == "summary of Hiking in Zermatt"
    contents = [r[0] for r in app.execute(
        "SELECT content FROM chat_message WHERE chat_id = %s ORDER BY created_at, role DESC", (chat_id,))]
    assert sorted(contents) == sorted(["Which trail to Gornergrat?", "Take the Riffelsee path."])

    for column in ("title", "chat", "summary"):
        stored = raw(app, "chat", column, chat_id)
        assert stored.lstrip('"').startswith("oc1:"), column
        assert "Zermatt" not in stored and "Gornergrat" not in stored
    for (stored,) in app.execute("SELECT content::text FROM public.chat_message WHERE chat_id = %s", (chat_id,)):
        assert stored.startswith('"oc1:') and "Gornergrat" not in stored and "Riffelsee" not in stored
    # Plaintext columns stay plaintext so Open WebUI can filter on them.
    assert raw(app, "chat", "meta", chat_id) == '{"tags": ["t1"]}'
    assert raw(app, "chat", "user_id", chat_id) == alice


def test_two_users_are_isolated(app, keyring):
    alice, bob = keyring.user(), keyring.user()
    keyring.activate(app, alice)
    a_chat = insert_chat(app, alice, "Alice's secret", [("user", "alice message")])
    app.commit()
    keyring.activate(app, bob)
    b_chat = insert_chat(app, bob, "Bob's secret", [("user", "bob message")])
    rows = dict(app.execute("SELECT id, title FROM chat").fetchall())
    assert rows == {a_chat: "[encrypted]", b_chat: "Bob's secret"}
    doc, summary = app.execute("SELECT chat, summary FROM chat WHERE id = %s", (a_chat,)).fetchone()
    assert doc == PLACEHOLDER_CHAT and summary is None
    contents = dict(app.execute("SELECT chat_id, content FROM chat_message").fetchall())
    assert contents == {a_chat: "[encrypted]", b_chat: "bob message"}
    app.commit()
    # No key at all: placeholders for everyone, never ciphertext, never an error.
    titles = {r[0] for r in app.execute("SELECT title FROM chat")}
    assert titles == {"[encrypted]"}


def test_no_key_write_fails_closed_and_writes_nothing(app, keyring):
    alice = keyring.user()
    with pytest.raises(psycopg.Error) as excinfo:
        insert_chat(app, alice, "written without a key", [("user", "x")])
    assert sqlstate_of(excinfo) == "OC001"
    assert "no user key is active" in str(excinfo.value)
    app.rollback()
    assert app.execute("SELECT count(*) FROM public.chat").fetchone()[0] == 0


def test_writing_another_users_row_fails_closed(app, keyring):
    alice, bob = keyring.user(), keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "mine", [("user", "hello")])
    app.commit()
    before = raw(app, "chat", "title", chat_id)
    keyring.activate(app, bob)
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("UPDATE chat SET title = 'hijacked' WHERE id = %s", (chat_id,))
    assert sqlstate_of(excinfo) == "OC002"
    app.rollback()
    keyring.activate(app, bob)
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("INSERT INTO chat_message (id, chat_id, user_id, role, content) VALUES ('m-x', %s, %s, 'user', %s)",
                    (chat_id, bob, Json("injected")))
    assert sqlstate_of(excinfo) == "OC002"
    app.rollback()
    keyring.activate(app, bob)
    with pytest.raises(psycopg.Error) as excinfo:
        insert_chat(app, alice, "pretending to be alice", [("user", "x")])
    assert sqlstate_of(excinfo) == "OC002"
    app.rollback()
    assert raw(app, "chat", "title", chat_id) == before
    assert app.execute("SELECT count(*) FROM public.chat").fetchone()[0] == 1


def test_activation_checks_the_key_belongs_to_the_user(app, keyring):
    alice, bob = keyring.user(), keyring.user()
    keyring.keys[alice], real = keyring.keys[bob], keyring.keys[alice]
    with pytest.raises(psycopg.Error) as excinfo:
        keyring.activate(app, alice)
    assert sqlstate_of(excinfo) == "OC005"
    app.rollback()
    keyring.keys[alice] = real
    with pytest.raises(psycopg.Error) as excinfo:
        keyring.activate(app, "no-such-user")
    assert sqlstate_of(excinfo) == "OC005"
    app.rollback()
    assert app.execute("SELECT owui_crypto.active_user()").fetchone()[0] is None


def test_garbled_transport_token_is_refused(app, keyring):
    alice = keyring.user()
    transport = keyring.activate(app, alice)
    app.commit()
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("SELECT owui_crypto.activate(%s, %s, %s, NULL)",
                    (alice, list(transport.known), ["gAAAAgarbage"] * len(transport.known)))
    assert sqlstate_of(excinfo) == "OC004"


def test_no_key_survives_the_transaction(app, keyring):
    alice = keyring.user()
    for end in (app.commit, app.rollback):
        keyring.activate(app, alice)
        assert app.execute("SELECT owui_crypto.active_user()").fetchone()[0] == alice
        end()
        settings = app.execute(
            "SELECT current_setting('owui_crypto.user_key', true), current_setting('owui_crypto.share_key', true),"
            " owui_crypto.active_user()").fetchone()
        assert settings in (("", "", None), (None, None, None))


def test_tampered_ciphertext_fails_for_the_owner(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "untouched", [("user", "x")])
    app.commit()
    stored = raw(app, "chat", "title", chat_id)
    flipped = stored[:-6] + ("A" if stored[-6] != "A" else "B") + stored[-5:]
    app.execute("ALTER TABLE public.chat DISABLE TRIGGER owui_crypto_seal_direct")
    app.execute("UPDATE public.chat SET title = %s WHERE id = %s", (flipped, chat_id))
    app.execute("ALTER TABLE public.chat ENABLE TRIGGER owui_crypto_seal_direct")
    app.commit()
    keyring.activate(app, alice)
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()
    assert sqlstate_of(excinfo) == "OC003"


def test_sealed_value_is_bound_to_its_row_and_column(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    first = insert_chat(app, alice, "first title", [("user", "x")])
    second = insert_chat(app, alice, "second title", [("user", "y")])
    app.commit()
    # Copy ciphertext between rows and between columns, straight in the base table
    # (a sealed value passes the base trigger untouched, as COPY and restores need).
    app.execute("UPDATE public.chat SET title = (SELECT title FROM public.chat WHERE id = %s) WHERE id = %s",
                (first, second))
    app.execute("UPDATE public.chat SET summary = title WHERE id = %s", (first,))
    app.commit()
    keyring.activate(app, alice)
    for query, args in (("SELECT title FROM chat WHERE id = %s", (second,)),
                        ("SELECT summary FROM chat WHERE id = %s", (first,))):
        with pytest.raises(psycopg.Error) as excinfo:
            app.execute(query, args).fetchone()
        assert sqlstate_of(excinfo) == "OC003"
        app.rollback()
        keyring.activate(app, alice)
    assert app.execute("SELECT title FROM chat WHERE id = %s", (first,)).fetchone()[0] == "first title"


def test_metadata_updates_need_no_key_and_keep_ciphertext(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "pinned later", [("user", "x")])
    app.commit()
    before = app.execute("SELECT title, chat::text, summary FROM public.chat WHERE id = %s", (chat_id,)).fetchone()
    msg_before = app.execute("SELECT content::text FROM public.chat_message WHERE chat_id = %s", (chat_id,)).fetchall()
    # No key active: pin, archive, move to a folder, tag (meta), timer, read marker.
    row = app.execute(
        "UPDATE chat SET pinned = true, archived = true, folder_id = 'f1', meta = %s, timer_at = 42, last_read_at = 7"
        " WHERE id = %s RETURNING id, title, pinned", (Json({"tags": ["a", "b"]}), chat_id)).fetchone()
    assert row == (chat_id, "[encrypted]", True)
    app.execute("UPDATE chat_message SET done = false, meta = '{}' WHERE chat_id = %s", (chat_id,))
    app.commit()
    after = app.execute("SELECT title, chat::text, summary FROM public.chat WHERE id = %s", (chat_id,)).fetchone()
    assert after == before
    assert app.execute("SELECT content::text FROM public.chat_message WHERE chat_id = %s",
                       (chat_id,)).fetchall() == msg_before
    assert app.execute("SELECT pinned, archived, folder_id, meta::text, timer_at FROM public.chat WHERE id = %s",
                       (chat_id,)).fetchone() == (True, True, "f1", '{"tags": ["a", "b"]}', 42)
    keyring.activate(app, alice)
    assert app.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()[0] == "pinned later"


def test_owner_rewrite_of_unchanged_content_keeps_ciphertext(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "same", [("user", "x")])
    before = raw(app, "chat", "chat", chat_id)
    # An ORM that writes every column back, unchanged, must not reseal.
    app.execute("UPDATE chat SET title = title, chat = chat, updated_at = updated_at + 1 WHERE id = %s", (chat_id,))
    assert raw(app, "chat", "chat", chat_id) == before
    app.execute("UPDATE chat SET title = 'renamed' WHERE id = %s", (chat_id,))
    assert app.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()[0] == "renamed"


def test_json_round_trips_byte_for_byte(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    text = '{ "z": 1,  "a" : [1, 2.50, "\\u0000", "\\ud83d\\ude00 é"], "a": "dup",\n "k": {"y": null} }'
    app.execute("INSERT INTO chat (id, user_id, title, chat, meta) VALUES ('j1', %s, 't', %s::json, '{}')",
                (alice, text))
    assert app.execute("SELECT chat::text FROM chat WHERE id = 'j1'").fetchone()[0] == text
    # The \u0000 filter of Open WebUI's search sees the plaintext.
    assert app.execute(r"SELECT count(*) FROM chat WHERE chat::text NOT LIKE '%\\u0000%'").fetchone()[0] == 0
    # json operators work on the opened value; with duplicate keys json's last one wins.
    app.execute("""INSERT INTO chat (id, user_id, title, chat, meta)
                   VALUES ('j2', %s, 't', '{"a": 1, "k": {"y": null}, "a": "dup"}', '{}')""", (alice,))
    row = app.execute("SELECT chat->'k'->>'y' IS NULL, chat->>'a' FROM chat WHERE id = 'j2'").fetchone()
    assert row == (True, "dup")


def test_python_opens_what_sql_sealed_with_binding(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "interop é ☃", [("user", "x")])
    stored = raw(app, "chat", "title", chat_id)
    key = keyring.keys[alice]
    assert envelope.open_(key, envelope.binding("chat", "title", chat_id), stored) == "interop é ☃"
    with pytest.raises(envelope.SealedValueError):
        envelope.open_(key, envelope.binding("chat", "title", "other-row"), stored)
    # And SQL opens what Python sealed.
    key_id = envelope.key_id_of(stored)
    sealed = envelope.seal(key, key_id, envelope.binding("chat", "summary", chat_id), "from python")
    app.execute("UPDATE public.chat SET summary = %s WHERE id = %s", (sealed, chat_id))
    assert app.execute("SELECT summary FROM chat WHERE id = %s", (chat_id,)).fetchone()[0] == "from python"


def share_a_chat(app, keyring, title: str, share_id: str) -> tuple[str, str, str]:
    """Alice writes a chat and shares it (a snapshot row in shared_chat); returns alice, bob, the chat id."""
    alice, bob = keyring.user(), keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, title, [("user", "x")])
    app.execute("INSERT INTO shared_chat (id, chat_id, user_id, title, chat) SELECT %s, id, user_id, title, chat"
                " FROM chat WHERE id = %s", (share_id, chat_id))
    app.commit()
    return alice, bob, chat_id


def test_shared_chat_sealed_under_share_key(app, keyring):
    alice, bob, _ = share_a_chat(app, keyring, "to share", "s1")
    assert raw(app, "shared_chat", "title", "s1").startswith("oc1:")
    keyring.activate(app, bob)  # another user, with the share key
    assert app.execute("SELECT title FROM shared_chat WHERE id = 's1'").fetchone()[0] == "to share"
    app.commit()
    keyring.activate(app, None)  # anonymous reader: share key only
    assert app.execute("SELECT title FROM shared_chat WHERE id = 's1'").fetchone()[0] == "to share"
    app.commit()
    keyring.activate(app, alice, share=False)
    assert app.execute("SELECT title FROM shared_chat WHERE id = 's1'").fetchone()[0] == "[encrypted]"
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("UPDATE shared_chat SET title = 'x' WHERE id = 's1'")
    assert sqlstate_of(excinfo) == "OC001"


def test_moving_sealed_content_to_another_owner_is_refused(app, keyring):
    alice, bob = keyring.user(), keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "stays with alice", [("user", "x")])
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("UPDATE chat SET user_id = %s WHERE id = %s", (bob, chat_id))
    assert sqlstate_of(excinfo) == "OC007"


def test_delete_needs_no_key_and_returns_rows(app, keyring):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "to delete", [("user", "x")])
    app.commit()
    keyring.activate(app, alice)
    assert app.execute("DELETE FROM chat WHERE id = %s RETURNING title", (chat_id,)).fetchone() == ("to delete",)
    app.commit()
    assert app.execute("SELECT count(*) FROM public.chat_message").fetchone()[0] == 0


def test_views_work_under_forced_parallel_plans(app, keyring):
    """fernet_open() uses a subtransaction; the open functions must keep the planner from parallel workers."""
    alice = keyring.user()
    keyring.activate(app, alice)
    for i in range(20):
        insert_chat(app, alice, f"parallel {i}", [("user", "x")])
    app.execute("SET LOCAL force_parallel_mode = on")
    app.execute("SET LOCAL parallel_setup_cost = 0")
    app.execute("SET LOCAL parallel_tuple_cost = 0")
    titles = [r[0] for r in app.execute("SELECT title FROM chat ORDER BY title")]
    assert titles[0] == "parallel 0" and len(titles) == 20


def test_only_the_chats_owner_writes_its_share(app, keyring):
    _, bob, chat_id = share_a_chat(app, keyring, "alice shares", "s2")
    before = raw(app, "shared_chat", "chat", "s2")
    # Bob (say, an admin) reads placeholders for the chat: he must not snapshot them over the share.
    keyring.activate(app, bob)
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("UPDATE shared_chat SET (title, chat) = (SELECT title, chat FROM chat WHERE id = %s)"
                    " WHERE id = 's2'", (chat_id,))
    assert sqlstate_of(excinfo) == "OC002"
    app.rollback()
    keyring.activate(app, bob)
    with pytest.raises(psycopg.Error) as excinfo:
        app.execute("INSERT INTO shared_chat (id, chat_id, user_id, title, chat) VALUES ('s3', %s, %s, 'x', '{}')",
                    (chat_id, bob))
    assert sqlstate_of(excinfo) == "OC002"
    app.rollback()
    assert raw(app, "shared_chat", "chat", "s2") == before
