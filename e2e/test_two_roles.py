"""``owui-crypto serve`` with two roles: it migrates as the owner and serves Open WebUI as an application role.

A server and a database of its own (``e2e.conftest.start_owui``): the database belongs to a role that is not a
superuser (``owner``, as the master user on Aurora), and Open WebUI connects as a plain login role (``app``) that
serve grants at start. Then the tests use Open WebUI as its web client does, and attack with the application
role's SQL -- what an injection into Open WebUI would run -- directly over a connection of that role.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from app_adapter import devdb
from e2e.conftest import Owui, database_roles, start_owui, stop_owui
from e2e.llm_stub import LlmStub
from e2e.owui_api import Chat, User, add_user, message_texts, new_chat, ok, signup, tokens


@dataclass
class Stack:
    owui: Owui
    database: str
    owner: str
    app: str
    owner_url: str
    owner_password: str
    app_url: str
    alice: User
    bob: User
    alice_chat: Chat
    bob_chat: Chat


@pytest.fixture(scope="module")
def stack(pg_server: devdb.Server, kms_server, llm: LlmStub,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with database_roles(pg_server, "owui_crypto_e2e_roles") as roles:
        database = pg_server.create_database("owui_crypto_e2e_roles", owner=roles.owner)
        handle = None
        try:
            url = pg_server.url(database)
            handle = start_owui(url, database, llm, tmp_path_factory.mktemp("owui-two-roles"), {}, roles=roles)
            with handle.client() as anonymous:
                alice = signup(anonymous, "Alice Admin", "alice.roles@example.com", "alice-Pw-12345")
                with handle.client(alice.token) as admin_client:
                    bob = add_user(admin_client, "Bob User", "bob.roles@example.com", "bob-Pw-123456", anonymous)
            with handle.client(alice.token) as c:
                alice_chat = new_chat(c, alice, "alice roles")
            with handle.client(bob.token) as c:
                bob_chat = new_chat(c, bob, "bob roles")
            yield Stack(handle, database, roles.owner, roles.app, roles.owner_url(url), roles.owner_password,
                        roles.app_url(url), alice, bob, alice_chat, bob_chat)
        finally:
            if handle is not None:
                stop_owui(handle)
            pg_server.drop_database(database)


def attempt(conn: psycopg.Connection, query: str, params: tuple | None = None) -> str:
    """The SQLSTATE with which the server refused ``query``, each attempt in a transaction of its own (rolled back).
    Without parameters the text is sent as it is (function bodies hold '%')."""
    try:
        conn.execute(query.encode() if params is None else query, params)
    except psycopg.Error as exc:
        conn.rollback()
        assert exc.sqlstate, f"not the server's refusal: {exc!r}"
        return exc.sqlstate
    conn.rollback()
    return "worked"


def test_serve_says_it_runs_with_two_roles(stack: Stack) -> None:
    log = stack.owui.log()
    assert f"serving Open WebUI as {stack.app} (DATABASE_URL)" in log
    assert f"granted {stack.app} the decrypting views" in log
    assert "one database role for everything" not in log
    assert stack.owner_password not in log and stack.owner_url not in log


def test_open_webui_works_as_the_application_role(stack: Stack) -> None:
    for user, chat in ((stack.alice, stack.alice_chat), (stack.bob, stack.bob_chat)):
        with stack.owui.client(user.token) as c:
            assert {r["id"]: r["title"] for r in ok(c.get("/api/v1/chats/list")).json()} == {chat.id: chat.title}
            body = ok(c.get(f"/api/v1/chats/{chat.id}")).json()
            assert body["title"] == chat.title and message_texts(body["chat"]) == sorted(chat.texts)
            found = ok(c.get("/api/v1/chats/search", params={"text": tokens(chat.texts[1])[0]})).json()
            assert [(r["id"], r["title"]) for r in found] == [(chat.id, chat.title)]
            by_title = ok(c.get("/api/v1/chats/search", params={"text": tokens(chat.title)[0]})).json()
            assert [r["id"] for r in by_title] == [chat.id]
    with stack.owui.client(stack.bob.token) as c:
        ok(c.get(f"/api/v1/chats/{stack.alice_chat.id}"), 401, 404)


def test_open_webuis_connections_are_the_application_role(stack: Stack, pg_server: devdb.Server) -> None:
    with stack.owui.client(stack.alice.token) as c:  # a request, so the pool holds a connection
        ok(c.get("/api/v1/chats/list"))
    with pg_server.connect(stack.database) as superuser:
        seen = {r[0] for r in superuser.execute(
            "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'")}
    assert seen == {stack.app}


def test_the_application_roles_sql_cannot_replace_owui_cryptos_functions(stack: Stack) -> None:
    with psycopg.connect(stack.app_url) as app:
        definitions = [r[0] for r in app.execute(
            "SELECT pg_get_functiondef(p.oid) FROM pg_proc p WHERE p.pronamespace = 'owui_crypto'::regnamespace"
            " AND p.prokind = 'f' ORDER BY p.oid")]
        app.rollback()
        outcomes = {definition.split("(", 1)[0]: attempt(app, definition) for definition in definitions}
        planted = attempt(app, "CREATE FUNCTION owui_crypto.planted() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    assert len(definitions) > 20
    assert {what: state for what, state in outcomes.items() if state != "42501"} == {}
    assert planted == "42501"


@pytest.mark.parametrize("statement", [
    "CREATE TABLE public.loot (k text)",
    "CREATE FUNCTION public.trojan_eq(a varchar, b varchar) RETURNS boolean LANGUAGE sql AS 'SELECT a::text = b::text'",
    "CREATE VIEW public.chat_copy AS SELECT 1 AS x",
    "CREATE TEMP TABLE loot (k text)",
    "CREATE SCHEMA loot",
])
def test_the_application_roles_sql_cannot_plant_code(stack: Stack, statement: str) -> None:
    with psycopg.connect(stack.app_url) as app:
        assert attempt(app, statement) == "42501"


def test_the_application_roles_sql_reads_no_other_users_data_and_no_keys(stack: Stack) -> None:
    written = stack.alice_chat.secrets() + stack.bob_chat.secrets()
    with psycopg.connect(stack.app_url) as app:
        through_views = app.execute("SELECT title, chat::text FROM owui_crypto_view.chat").fetchall()
        messages = app.execute("SELECT content::text FROM owui_crypto_view.chat_message").fetchall()
        app.rollback()
        denied = {relation: attempt(app, f"SELECT * FROM {relation}") for relation in (
            "public.chat", "public.chat_message", "owui_crypto.user_key", "owui_crypto.deployment_key",
            "owui_crypto.grantee", "owui_crypto_alembic_version")}
        forget = attempt(app, "SELECT owui_crypto.forget_user_key(%s)", (stack.bob.id,))
        app.commit()
    assert len(through_views) == 2 and {title for title, _ in through_views} == {"[encrypted]"}
    shown = repr(through_views) + repr(messages)
    assert not [s for s in written if s in shown]
    assert not {t for s in written for t in tokens(s)} & set(tokens(shown))
    assert denied == dict.fromkeys(denied, "42501")
    assert forget in ("OC002", "42501")  # a live user's key stays registered
    with stack.owui.client(stack.bob.token) as c:
        assert ok(c.get(f"/api/v1/chats/{stack.bob_chat.id}")).json()["title"] == stack.bob_chat.title
