"""No key and no chat text in the server log, the system views or a dump."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
from psycopg import sql

from tests.owui import insert_chat
from tests.serverlog import LogWindow, key_forms, server_log_path

CANARY_TITLE = "canary-title-7f3a9c"
CANARY_TEXT = "canary-message-0b1e44 tell nobody"

# What the tests turn on, per test database. log_parameter_max_length = 0 is
# the one setting owui-crypto requires of a server (see README): without it,
# log_statement logs every bind parameter, including the chat text the
# application writes. Keys stay safe even then (see the second test).
LOUD = {
    "log_statement": "all",
    "log_min_duration_statement": "0",
    "log_min_error_statement": "error",
    "log_error_verbosity": "verbose",
    "session_preload_libraries": "auto_explain",
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_analyze": "on",
    "auto_explain.log_nested_statements": "on",
    "log_parameter_max_length": "0",
}
LOUDEST = {**LOUD, "log_parameter_max_length": "-1", "log_parameter_max_length_on_error": "-1",
           "auto_explain.log_verbose": "on"}


def configure(pg_server, db: str, settings: dict[str, str]) -> None:
    with pg_server.connect() as admin:
        for name, value in settings.items():
            admin.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(db), sql.SQL(name), sql.Literal(value)))


def workload(db_url: str, keyring) -> dict[str, str]:
    """Two users write, read, search, fail; returns the chat ids."""
    seen_activity: list[str] = []
    with psycopg.connect(db_url, options="-c search_path=owui_crypto_view,public,pg_temp") as conn:
        alice, bob = keyring.user(), keyring.user()
        keyring.activate(conn, alice)
        chat_id = insert_chat(conn, alice, CANARY_TITLE, [("user", CANARY_TEXT), ("assistant", CANARY_TEXT)])
        conn.execute("INSERT INTO shared_chat (id, chat_id, user_id, title, chat) SELECT 'share-1', id, user_id,"
                     " title, chat FROM chat WHERE id = %s", (chat_id,))
        # While a keyed transaction is open, another session looks at pg_stat_activity.
        with psycopg.connect(db_url, autocommit=True) as spy:
            seen_activity += [r[0] or "" for r in spy.execute("SELECT query FROM pg_stat_activity")]
        conn.commit()
        for _ in range(6):  # past psycopg's prepare threshold: prepared statements log too
            keyring.activate(conn, alice)
            assert conn.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()[0] == CANARY_TITLE
            conn.execute("SELECT count(*) FROM chat WHERE title ILIKE %s", ("%canary%",))
            conn.commit()
        transport = keyring.activate(conn, bob)
        conn.execute("SELECT chat FROM chat WHERE id = %s", (chat_id,))
        with pytest.raises(psycopg.Error):
            conn.execute("UPDATE chat SET title = %s WHERE id = %s", (CANARY_TITLE + "-bob", chat_id))
        conn.rollback()
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT owui_crypto.activate(%s, %s, %s, NULL)",
                         (alice, list(transport.known), ["gAAAAgarbled"]))
        conn.rollback()
    for query in seen_activity:
        for key in (keyring.keys[alice], keyring.keys[bob], keyring.share()):
            assert not any(form in query for form in key_forms(key))
        assert CANARY_TEXT not in query and CANARY_TITLE not in query
    return {"chat": chat_id}


def assert_log_clean(text: str, keyring, *, plaintext_too: bool) -> None:
    assert "owui_crypto.activate" in text, "the server log shows no statements: logging is not on"
    assert "Query Text" in text or "duration:" in text
    for key in [*keyring.keys.values(), keyring.share()]:
        for form in key_forms(key):
            assert form not in text
    if plaintext_too:
        assert CANARY_TITLE not in text and CANARY_TEXT not in text


def test_no_key_or_plaintext_in_log_or_dump(pg_server, db, db_url, keyring):
    configure(pg_server, db, LOUD)
    with psycopg.connect(db_url) as conn:
        window = LogWindow(server_log_path(conn))
    workload(db_url, keyring)
    assert_log_clean(window.read(), keyring, plaintext_too=True)
    dump = subprocess.run(["pg_dump", db_url], check=True, capture_output=True, text=True).stdout
    assert "owui_crypto" in dump and "oc1:" in dump
    assert CANARY_TITLE not in dump and CANARY_TEXT not in dump
    for key in [*keyring.keys.values(), keyring.share()]:
        assert not any(form in dump for form in key_forms(key))


def test_no_key_in_log_even_with_parameters_and_verbose_plans_logged(pg_server, db, db_url, keyring):
    configure(pg_server, db, LOUDEST)
    with psycopg.connect(db_url) as conn:
        window = LogWindow(server_log_path(conn))
    workload(db_url, keyring)
    text = window.read()
    assert "parameters: $1" in text  # parameters really were logged
    assert_log_clean(text, keyring, plaintext_too=False)


def test_no_key_or_plaintext_in_log_through_the_adapter(pg_server, db, db_url, kms_server):
    """The same, with the real adapter: KMS-wrapped keys, the engine hook, SQLAlchemy."""
    import sqlalchemy as sa

    from app_adapter.hook import Adapter
    from app_adapter.keys import KeyService

    configure(pg_server, db, LOUD)
    service = KeyService(kms_server.settings(), db_url)
    with psycopg.connect(db_url) as conn:
        window = LogWindow(server_log_path(conn))
        for uid in ("canary-alice", "canary-bob"):
            conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', (uid, f"{uid}@example.com"))
            service.provision(conn, uid)
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    adapter = Adapter(service)
    adapter.install(engine)
    try:
        with adapter.acting_as_sync("canary-alice"):
            for i in range(8):
                with engine.begin() as conn:
                    conn.execute(sa.text("INSERT INTO chat (id, user_id, title, chat, meta) VALUES "
                                         "(:id, 'canary-alice', :t, CAST(:c AS json), '{}')"),
                                 {"id": f"c{i}", "t": CANARY_TITLE, "c": f'{{"text": "{CANARY_TEXT}"}}'})
                    assert conn.execute(sa.text("SELECT title FROM chat WHERE id = :id"),
                                        {"id": f"c{i}"}).scalar_one() == CANARY_TITLE
        with adapter.acting_as_sync("canary-bob"), engine.begin() as conn:
            assert {r[0] for r in conn.execute(sa.text("SELECT title FROM chat"))} == {"[encrypted]"}
        # every activation went out with its BEGIN (transport.with_begin): that path is the one checked here
        assert adapter.metrics()["with_begin"] == adapter.metrics()["activations"] == 9
    finally:
        engine.dispose()
    text = window.read()
    assert "owui_crypto.activate" in text
    for uid in ("canary-alice", "canary-bob"):
        for form in key_forms(service.dek(uid).reveal()):
            assert form not in text
    for form in key_forms(service.share_key().reveal()):
        assert form not in text
    assert CANARY_TITLE not in text and CANARY_TEXT not in text
    service.kms.close()
