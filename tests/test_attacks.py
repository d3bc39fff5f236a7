"""The security regression suite: every test is an attack, and asserts that it fails and that nothing leaks.

Attackers never hold a superuser. They hold one of: a plain ``pg_dump``; the application role (granted with
``owui-crypto grant``) on a pooled connection that other clients use before and after them; Open WebUI's own
role, which owns the base tables; a read-only role; the server's log with bind parameters in it. The roles and
the per-test database come from ``tests/roles.py``. Findings 1-8 are the issue's; the rest are our own.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import psycopg
import pytest
from cryptography.fernet import Fernet, InvalidToken
from psycopg import sql
from psycopg.types.json import Json

from app_adapter import cli, devdb, envelope, userkeys
from app_adapter.errors import CannotUnwrap, InvalidInput
from app_adapter.keys import KeyService
from app_adapter.transport import Transport
from tests.kms_fixtures import KmsServer
from tests.owui import insert_chat, raw
from tests.roles import People, Site
from tests.serverlog import LogWindow

CANARY_TITLE = "attack-canary-title-5d2e"
CANARY_TEXT = "attack-canary-text-91c7 tell nobody"
PLACEHOLDER = "[encrypted]"
# Statements with every bind parameter, in full: what a careless server configuration logs.
LOG_PARAMETERS = {"log_statement": "all", "log_parameter_max_length": "-1"}
FERNET_TOKEN = re.compile(r"gAAAAA[A-Za-z0-9_-]+=*")


# -- the scene: two users, a chat each, Alice's chat shared --------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    alice: str
    bob: str
    alice_chat: str
    bob_chat: str
    bob_message: str


@pytest.fixture
def scene(site: Site, people: People) -> Scene:
    """Alice and Bob wrote a chat each through the views, as the application does; Alice shared hers."""
    alice, bob = people.user(), people.user()
    with site.app() as app:
        people.activate(app, alice)
        alice_chat = insert_chat(app, alice, CANARY_TITLE, [("user", CANARY_TEXT), ("assistant", CANARY_TEXT)])
        app.execute("INSERT INTO shared_chat (id, chat_id, user_id, title, chat) SELECT %s, id, user_id, title, chat"
                    " FROM chat WHERE id = %s", (f"share-{alice_chat}", alice_chat))
        app.commit()
        people.activate(app, bob)
        bob_chat = insert_chat(app, bob, "Bob's own chat", [("user", "bob's message")])
        app.commit()
    with site.owner() as owner:
        (bob_message,) = owner.execute("SELECT id FROM public.chat_message WHERE chat_id = %s", (bob_chat,)).fetchone()
    return Scene(alice, bob, alice_chat, bob_chat, bob_message)


def title_of(site: Site, people: People, user_id: str, chat_id: str) -> str:
    """What ``user_id`` reads as the chat's title, in a transaction of their own."""
    with site.app() as app:
        people.activate(app, user_id)
        return app.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()[0]


def key_id(people: People, user_id: str) -> str:
    return userkeys.key_id(people.keys[user_id])


@dataclass(frozen=True)
class Attempt:
    sqlstate: str | None
    row: tuple | None


def attempt(conn: psycopg.Connection, query: str | sql.Composable,
            params: Sequence[object] | Mapping[str, object] = ()) -> Attempt:
    """Run one statement in a savepoint of the current transaction; what it returned or the SQLSTATE it raised."""
    try:
        with conn.transaction():
            cursor = conn.execute(query, params)
            return Attempt(None, cursor.fetchone() if cursor.description else None)
    except psycopg.Error as exc:
        return Attempt(exc.sqlstate, None)


# -- what an attacker can do with a dump ---------------------------------------------------------------------------


def copy_rows(dump: str, table: str) -> list[dict[str, str | None]]:
    """The rows of ``table`` in a plain pg_dump, unescaped from COPY's text format."""
    found = re.search(rf"^COPY {re.escape(table)} \((.*?)\) FROM stdin;\n(.*?)^\\\.$", dump, re.MULTILINE | re.DOTALL)
    if found is None:
        return []
    columns = [c.strip().strip('"') for c in found[1].split(",")]
    escapes = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v"}
    return [dict(zip(columns, [None if v == r"\N" else re.sub(r"\\(.)", lambda m: escapes.get(m[1], m[1]), v)
                               for v in line.split("\t")], strict=True))
            for line in found[2].splitlines()]


def as_bytes(value: str | bytes | memoryview | None) -> bytes | None:
    """A bytea as a dump (``\\x...``) or a driver (bytes, memoryview) shows it."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, memoryview):
        return value.tobytes()
    return bytes.fromhex(value[2:]) if value.startswith("\\x") else value.encode()


def user_key_derivations(users: Iterable[dict[str, object]]) -> tuple[list[bytes], list[bytes]]:
    """Every user key the code base can derive from what a "user" row holds, and every DEK they open.

    Secrets tried: the user id (the memo's default), email and name, through PBKDF2 with the row's salt; and the
    ``user_key`` column itself. Returns (the 32-byte user keys derived, the DEKs that opened).
    """
    derived: list[bytes] = []
    opened: list[bytes] = []
    for user in users:
        sealed, salt = user.get("user_encrypted_dek"), as_bytes(user.get("salt"))  # type: ignore[arg-type]
        fernet_keys = [str(user["user_key"]).encode()] if user.get("user_key") else []
        for secret in (user.get("id"), user.get("email"), user.get("name")):
            if secret and salt is not None:
                try:
                    fernet_keys.append(userkeys.derive_user_key(str(secret).encode(), salt))
                except InvalidInput:
                    continue
        for fernet_key in fernet_keys:
            with contextlib.suppress(binascii.Error, ValueError):
                derived.append(base64.urlsafe_b64decode(fernet_key))
            if sealed:
                with contextlib.suppress(CannotUnwrap, InvalidInput):
                    opened.append(userkeys.open_dek_for_user(str(sealed).encode(), fernet_key).reveal())
    return derived, opened


def thirty_two_byte_values(text: str) -> set[bytes]:
    """Every 32-byte value spelled in ``text``: 64 hex digits, or 43 base64/base64url characters (+ padding)."""
    found = {bytes.fromhex(h) for h in re.findall(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])", text)}
    for b64 in re.findall(r"(?<![\w+/-])[\w+/-]{43}=?(?![\w+/=-])", text):
        try:
            value = base64.urlsafe_b64decode(b64.replace("+", "-").replace("/", "_").rstrip("=") + "=")
        except (binascii.Error, ValueError):
            continue
        if len(value) == 32:
            found.add(value)
    return found


def opens(candidate: bytes, bind: str, sealed: str) -> bool:
    try:
        envelope.open_(candidate, bind, sealed)
    except envelope.SealedValueError:
        return False
    return True


def provision(site: Site, service: KeyService, people: People, user_id: str) -> None:
    """Sign a user up as `owui-crypto serve` does: a "user" row, then KeyService.provision (KMS)."""
    people.row(user_id)
    with psycopg.connect(site.owner_url) as conn:
        service.provision(conn, user_id)
    people.keys[user_id] = service.dek(user_id).reveal()


@pytest.fixture
def kms_service(kms_server: KmsServer, site: Site, people: People) -> Iterator[KeyService]:
    """The adapter's KeyService on the attack database (moto's KMS over HTTP); its share key is the site's."""
    service = KeyService(kms_server.settings(), site.owner_url)
    people.share_key = service.share_key().reveal()
    yield service
    service.kms.close()


def test_dump_without_kms_opens_nothing(site: Site, people: People, kms_service: KeyService) -> None:
    """Finding 1 (a dump opens everything). The attacker holds a plain pg_dump and no KMS.

    They try every derivation the code base can do from what the dump holds (PBKDF2 of the user id, email or name
    with the row's salt; the user_key column) to open user_encrypted_dek, and every 32-byte value in the dump as the
    DEK of a sealed title. Nothing opens, no candidate is a registered key, and the chat text is not in the dump.
    """
    alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    for user_id in (alice, bob):
        provision(site, kms_service, people, user_id)
    with site.app() as app:
        people.activate(app, alice)
        chat_id = insert_chat(app, alice, CANARY_TITLE, [("user", CANARY_TEXT)])
        app.commit()
    dump = subprocess.run(["pg_dump", site.server.url(site.name)], check=True, capture_output=True, text=True).stdout

    assert CANARY_TITLE not in dump and CANARY_TEXT not in dump
    users = copy_rows(dump, 'public."user"')
    assert {alice, bob} <= {user["id"] for user in users}
    derived, opened = user_key_derivations(users)
    assert opened == []
    (sealed_title,) = [row["title"] for row in copy_rows(dump, "public.chat") if row["id"] == chat_id]
    registered = {as_bytes(row["fingerprint"]) for row in copy_rows(dump, "owui_crypto.user_key")}
    assert len(registered) == 2
    candidates = thirty_two_byte_values(dump) | set(derived)
    assert candidates, "the dump holds no 32-byte value at all: the search is broken"
    assert [c for c in candidates if userkeys.fingerprint(c) in registered] == []
    assert [c for c in candidates if opens(c, envelope.binding("chat", "title", chat_id), sealed_title)] == []


# -- finding 2: pg_temp objects inside definer code -----------------------------------------------------------------

# Temporary objects named like what owui_crypto's code resolves by name. Every CHECK calls the probe, which
# records who ran it and what it saw, in a table anyone may write (so the probe works whoever runs it).
TEMP_TRAP = """
CREATE TEMP TABLE probe_log (who pg_catalog.text, seen pg_catalog.text);
GRANT ALL ON probe_log TO PUBLIC;
CREATE FUNCTION pg_temp.probe(v pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pg_temp.probe_log VALUES (CURRENT_USER::pg_catalog.text, v);
    RETURN true;
END
$$;
CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.probe(VALUE));
CREATE DOMAIN pg_temp.bytea AS pg_catalog.bytea CHECK (pg_temp.probe(pg_catalog.encode(VALUE, 'hex')));
CREATE DOMAIN pg_temp.json AS pg_catalog.json CHECK (pg_temp.probe(VALUE::pg_catalog.text));
CREATE DOMAIN pg_temp.name AS pg_catalog.name CHECK (pg_temp.probe(VALUE::pg_catalog.text));
CREATE DOMAIN pg_temp.regclass AS pg_catalog.regclass CHECK (pg_temp.probe(VALUE::pg_catalog.text));
CREATE TEMP TABLE user_key (user_id pg_catalog.text, key_id pg_catalog.text, fingerprint pg_catalog.bytea);
CREATE TEMP TABLE grantee (role_name pg_catalog.name);
"""


def test_temp_objects_never_run_inside_owui_crypto_code(site: Site, people: People, scene: Scene) -> None:
    """Finding 2 (pg_temp hijack). The attacker holds the application role, with TEMP given back.

    In a pooled session they leave temporary domains named text/bytea/json/name/regclass (their CHECK calls a
    probe recording current_user and the value) and tables named like the key ring, with pg_temp first on the
    session's path. Alice then works on that connection as the adapter does. The probe never runs (so never as the
    owner, and never sees a key), her work behaves normally and is sealed.
    """
    site.grant_temp()
    with site.app() as app:
        app.execute(TEMP_TRAP)
        app.execute("SET search_path = pg_temp, pg_catalog, owui_crypto_view, public")
        app.commit()
        people.activate(app, scene.alice, transport=Transport())
        title = app.execute("SELECT title FROM chat WHERE id = %s", (scene.alice_chat,)).fetchone()[0]
        chat_id = insert_chat(app, scene.alice, "written beside a trap", [("user", "a message beside a trap")])
        app.execute("UPDATE chat SET title = %s WHERE id = %s", ("renamed beside a trap", chat_id))
        app.execute("DELETE FROM chat_message WHERE chat_id = %s", (chat_id,))
        app.commit()
        people.activate(app, scene.alice)
        renamed = app.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()[0]
        app.commit()
        seen = app.execute("SELECT who, seen FROM pg_temp.probe_log").fetchall()
    assert [who for who, _ in seen if who != site.roles.app] == [], "a temp object ran as the owner"
    assert seen == [], "a temp object resolved inside owui_crypto's code"
    assert (title, renamed) == (CANARY_TITLE, "renamed beside a trap")
    with site.owner() as owner:
        assert raw(owner, "chat", "title", chat_id).startswith(f"oc1:{key_id(people, scene.alice)}:")


TEMP_OBJECTS = ["CREATE TEMP TABLE t (a int)", "CREATE TEMP VIEW v AS SELECT 1 AS a", "CREATE TEMP SEQUENCE s",
                "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql RETURN 1", "CREATE DOMAIN pg_temp.d AS int"]


def test_app_role_cannot_create_temp_objects_after_grant(site: Site, people: People, scene: Scene) -> None:
    """Finding 2. The attacker holds the application role as `owui-crypto grant` left it.

    It cannot make any temporary object (42501): not on a fresh session, and not after activate() has given the
    session a temporary schema of the owner's.
    """
    with site.app() as app:
        for phase in ("fresh session", "after activate()"):
            if phase == "after activate()":
                people.activate(app, scene.alice)
                app.commit()
            for statement in TEMP_OBJECTS:
                outcome = attempt(app, statement)
                assert outcome.sqlstate == "42501", (phase, statement, outcome)
            app.rollback()


# -- finding 3: a temporary view shadowing the decrypting view ------------------------------------------------------


@pytest.mark.parametrize("session_path", [None, "pg_temp, owui_crypto_view, public"])
def test_temp_view_never_shadows_the_decrypting_view(site: Site, people: People, scene: Scene,
                                                     session_path: str | None) -> None:
    """Finding 3 (temp view shadowing). The attacker holds the application role (TEMP given back) on a pooled
    connection.

    They leave a temporary view ``chat`` that shows the transaction's key as the title and a temporary table
    ``chat_message`` (optionally with pg_temp first on the session's path). The next client activates Alice as the
    adapter does: ``chat`` is the decrypting view (her real title), her message reaches the real table, sealed,
    and the attacker's table stays empty.
    """
    site.grant_temp()
    message_id = f"m-{uuid.uuid4()}"
    with site.app() as app:
        if session_path:
            app.execute(sql.SQL("SET search_path = {}").format(sql.SQL(session_path)))
        app.execute("CREATE TEMP VIEW chat AS SELECT v.id, v.user_id,"
                    " pg_catalog.current_setting('owui_crypto.user_key', true) AS title FROM owui_crypto_view.chat v")
        app.execute("CREATE TEMP TABLE chat_message AS SELECT * FROM owui_crypto_view.chat_message WITH NO DATA")
        app.commit()
        people.activate(app, scene.alice, transport=Transport())  # another client of the pool
        title = app.execute("SELECT title FROM chat WHERE id = %s", (scene.alice_chat,)).fetchone()[0]
        app.execute("INSERT INTO chat_message (id, chat_id, user_id, role, content, created_at, updated_at)"
                    " VALUES (%s, %s, %s, 'user', %s, 0, 0)",
                    (message_id, scene.alice_chat, scene.alice, Json(CANARY_TEXT)))
        app.commit()
        trapped = app.execute("SELECT count(*) FROM pg_temp.chat_message").fetchone()[0]
    assert title == CANARY_TITLE
    assert trapped == 0
    with site.owner() as owner:
        assert raw(owner, "chat_message", "content", message_id).startswith('"oc1:')


# -- finding 4: activate() with a key that is not the user's -------------------------------------------------------


@pytest.mark.parametrize("offered", ["NULL", "empty", "31 bytes", "33 bytes", "another user's key"])
def test_activate_refuses_a_bad_key(site: Site, people: People, scene: Scene, offered: str) -> None:
    """Finding 4. The attacker holds the application role and calls activate() for Alice, through the real
    Transport, with no key, an empty one, one of the wrong length, or Bob's: OC005, and nothing is active.
    """
    key = {"NULL": None, "empty": b"", "31 bytes": os.urandom(31), "33 bytes": os.urandom(33),
           "another user's key": people.keys[scene.bob]}[offered]
    with site.app() as app:
        people.activate(app, None)  # the transaction begins as the adapter's would, with nobody bound
        with pytest.raises(psycopg.Error) as excinfo, app.transaction():
            people.offer(app, scene.alice, key)
        assert excinfo.value.sqlstate == "OC005"
        row = app.execute("SELECT owui_crypto.active_user(), title FROM chat WHERE id = %s",
                          (scene.alice_chat,)).fetchone()
    assert row == (None, PLACEHOLDER)


# -- finding 5: strict envelopes ----------------------------------------------------------------------------------


def lookalikes(site: Site, scene: Scene) -> dict[str, str]:
    """JSON texts that look sealed: a mere prefix, and Bob's genuine envelope (another key id), copied."""
    with site.owner() as owner:
        bobs = raw(owner, "chat_message", "content", scene.bob_message)
    assert bobs is not None and bobs.startswith('"oc1:')
    return {"prefix": '"oc1:what alice typed, not an envelope"', "bob's envelope": bobs}


INSERT_PAST_THE_VIEW = ("INSERT INTO public.chat_message (id, chat_id, user_id, role, content, created_at, updated_at)"
                        " VALUES (%s, %s, %s, 'user', %s::json, 0, 0) ON CONFLICT DO NOTHING")


@pytest.mark.parametrize("lookalike", ["prefix", "bob's envelope"])
def test_lookalike_written_past_the_view_is_sealed(site: Site, people: People, scene: Scene, lookalike: str) -> None:
    """Finding 5a. The attacker is Open WebUI's own role (it owns the base tables) with the row's owner active.

    An upsert into public.chat_message of text that only looks sealed is stored sealed under Alice's key (the raw
    value differs) and reads back through the view exactly as written.
    """
    value, message_id = lookalikes(site, scene)[lookalike], f"m-{uuid.uuid4()}"
    with site.owui() as owui:
        people.activate(owui, scene.alice)
        owui.execute(INSERT_PAST_THE_VIEW, (message_id, scene.alice_chat, scene.alice, value))
        owui.commit()
        stored = raw(owui, "chat_message", "content", message_id)
        people.activate(owui, scene.alice)
        read = owui.execute("SELECT content::text FROM chat_message WHERE id = %s", (message_id,)).fetchone()[0]
    assert stored != value and stored.startswith(f'"oc1:{key_id(people, scene.alice)}:')
    assert read == value


@pytest.mark.parametrize("lookalike", ["prefix", "bob's envelope"])
@pytest.mark.parametrize(("actor", "sqlstate"), [("nobody", "OC001"), ("a third user", "OC002")])
def test_lookalike_written_past_the_view_needs_the_owners_key(site: Site, people: People, scene: Scene,
                                                              lookalike: str, actor: str, sqlstate: str) -> None:
    """Finding 5b/5c. Open WebUI's own role upserts a lookalike into Alice's chat with no key active (OC001) or
    with a third user's key (OC002): refused, and no row is written.
    """
    value, message_id = lookalikes(site, scene)[lookalike], f"m-{uuid.uuid4()}"
    with site.owui() as owui:
        people.activate(owui, people.user() if actor == "a third user" else None)
        outcome = attempt(owui, INSERT_PAST_THE_VIEW, (message_id, scene.alice_chat, scene.alice, value))
        owui.commit()
        written = owui.execute("SELECT count(*) FROM public.chat_message WHERE id = %s", (message_id,)).fetchone()[0]
    assert outcome.sqlstate == sqlstate
    assert written == 0


def test_copy_out_and_in_keeps_sealed_rows_byte_identical(site: Site, people: People, scene: Scene) -> None:
    """Finding 5d (behaviour kept). Open WebUI's own role, with no key, copies the sealed tables out, deletes them
    and copies them back in: every row byte-identical, and Alice still reads her chat.
    """
    tables = ["chat", "chat_message", "shared_chat"]
    before = site.snapshot()
    with site.owui() as owui, owui.cursor() as cur:
        copies: dict[str, bytes] = {}
        for table in tables:
            with cur.copy(sql.SQL("COPY public.{} TO STDOUT").format(sql.Identifier(table))) as copy:
                copies[table] = b"".join(bytes(chunk) for chunk in copy)
        for table in reversed(tables):
            cur.execute(sql.SQL("DELETE FROM public.{}").format(sql.Identifier(table)))
        for table in tables:
            with cur.copy(sql.SQL("COPY public.{} FROM STDIN").format(sql.Identifier(table))) as copy:
                copy.write(copies[table])
        owui.commit()
    assert site.snapshot() == before
    assert title_of(site, people, scene.alice, scene.alice_chat) == CANARY_TITLE


def test_lookalike_written_through_the_view_reads_back_exactly(site: Site, people: People, scene: Scene) -> None:
    """Finding 5e. Through the views, whatever the user writes is sealed: a title, a summary and a message that are
    perfect envelopes (one of them Bob's) are stored under Alice's key and read back exactly as written.
    """
    perfect = f"oc1:0123456789abcdef:{Fernet(Fernet.generate_key()).encrypt(b'x').decode()}"
    with site.owner() as owner:
        bobs_title = raw(owner, "chat", "title", scene.bob_chat)
    with site.app() as app:
        people.activate(app, scene.alice)
        chat_id = insert_chat(app, scene.alice, perfect, [("user", perfect)])
        app.execute("UPDATE chat SET summary = %s WHERE id = %s", (bobs_title, chat_id))
        app.commit()
        people.activate(app, scene.alice)
        read = app.execute("SELECT c.title, c.summary, m.content FROM chat c JOIN chat_message m ON m.chat_id = c.id"
                           " WHERE c.id = %s", (chat_id,)).fetchone()
    assert read == (perfect, bobs_title, perfect)
    with site.owner() as owner:
        for column in ("title", "summary"):
            assert raw(owner, "chat", column, chat_id).startswith(f"oc1:{key_id(people, scene.alice)}:")


# -- finding 6: the transport ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedCall:
    """An activate() statement as the server logged it, with its bind parameters."""

    statement: str
    params: dict[int, str | None]

    def tokens(self) -> list[str]:
        return [t for value in self.params.values() if value for t in FERNET_TOKEN.findall(value)]

    def replayable(self) -> tuple[str, list[str | None]]:
        """The same text and parameters, for psycopg (``$n`` becomes ``%s``, values in order of appearance)."""
        order = [int(n) for n in re.findall(r"\$(\d+)", self.statement)]
        return re.sub(r"\$\d+", "%s", self.statement), [self.params[n] for n in order]


def logged_activations(log: str, database: str | None) -> list[LoggedCall]:
    """Every ``owui_crypto.activate(...)`` that ``log`` shows (log_statement = all), each paired with its parameters
    by backend pid; only lines naming ``database`` unless it is None (a line prefix without ``%d``)."""
    pending: dict[str, str] = {}
    calls: list[LoggedCall] = []
    for line in log.splitlines():
        if database is not None and database not in line:
            continue
        if found := re.search(r"\[(\d+)\] .*?LOG:  execute [^:]*: (.*owui_crypto\.activate\(.*)$", line):
            pending[found[1]] = found[2]
        elif (found := re.search(r"\[(\d+)\] .*?DETAIL:  parameters: (.*)$", line)) and found[1] in pending:
            params = {int(n): None if whole == "NULL" else inner.replace("''", "'")
                      for n, whole, inner in re.findall(r"\$(\d+) = (NULL|'((?:[^']|'')*)')", found[2])}
            calls.append(LoggedCall(pending.pop(found[1]), params))
    return calls


@pytest.mark.parametrize("plant", ["SET", "set_config", "startup option"])
def test_planted_transport_key_opens_no_logged_token(site: Site, people: People, scene: Scene, plant: str) -> None:
    """Finding 6a (steered transport). The attacker holds the application role and the server log (statements with
    full parameters). They set owui_crypto.transport_key to a key they chose on a pooled connection (SET,
    set_config, or a startup option of the connection). Alice then activates on that connection: none of the
    tokens the log shows opens under the chosen key, and her activation works.
    """
    chosen = Fernet.generate_key().decode()
    planted = f"{secrets.token_hex(8)}:{chosen}"
    site.configure(LOG_PARAMETERS)
    options = f"-c owui_crypto.transport_key={planted}" if plant == "startup option" else ""
    with psycopg.connect(site.app_url, options=options) as pooled:
        if plant == "SET":
            pooled.execute(sql.SQL("SET owui_crypto.transport_key = {}").format(sql.Literal(planted)))
        elif plant == "set_config":
            pooled.execute("SELECT pg_catalog.set_config('owui_crypto.transport_key', %s, false)", (planted,))
        pooled.commit()
        window = LogWindow(site.log_path())
        people.activate(pooled, scene.alice, transport=Transport())  # the victim: the next client of the pool
        title = pooled.execute("SELECT title FROM chat WHERE id = %s", (scene.alice_chat,)).fetchone()[0]
        pooled.commit()
    tokens = [t for call in logged_activations(window.read(), site.log_database()) for t in call.tokens()]
    assert tokens, "the log shows no activate() token: is parameter logging on?"
    for token in tokens:
        with pytest.raises(InvalidToken):
            Fernet(chosen).decrypt(token)
    assert title == CANARY_TITLE


def test_app_role_cannot_learn_a_transport_key_of_its_backend(site: Site, people: People, scene: Scene) -> None:
    """Finding 6 (own variant). The attacker holds the application role, the server log, and the next turn on the
    pooled connection Alice just used. Whatever transport key they can get from the backend (the setting, the
    functions) opens none of her logged tokens.
    """
    site.configure(LOG_PARAMETERS)
    window = LogWindow(site.log_path())
    with site.app() as conn:
        people.activate(conn, scene.alice, transport=Transport())
        conn.commit()
        tokens = [t for call in logged_activations(window.read(), site.log_database()) for t in call.tokens()]
        learned = [attempt(conn, "SELECT pg_catalog.current_setting('owui_crypto.transport_key', true)"),
                   attempt(conn, "SELECT owui_crypto.transport_key()"),
                   attempt(conn, "SELECT owui_crypto.activate(NULL, '{}', '{}', '{}')")]
    keys = [o.row[0].split(":", 1)[1] for o in learned if o.row and o.row[0] and ":" in o.row[0]]
    assert tokens
    for key in keys:
        for token in tokens:
            with pytest.raises(InvalidToken):
                Fernet(key.encode()).decrypt(token)


@dataclass(frozen=True)
class Replay:
    pid: int
    sqlstate: str | None
    returned: str | None
    active_user: str | None
    title: str


def replay(conn: psycopg.Connection, call: LoggedCall, chat_id: str) -> Replay:
    """Send a logged activate() again, verbatim, in a transaction of ``conn`` (autocommit); then look around."""
    statement, params = call.replayable()
    with conn.transaction():
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        outcome = attempt(conn, statement, params)
        active, title = conn.execute("SELECT owui_crypto.active_user(), (SELECT title FROM owui_crypto_view.chat"
                                     " WHERE id = %s)", (chat_id,)).fetchone()
    return Replay(pid, outcome.sqlstate, outcome.row[0] if outcome.row else None, active, title)


def assert_replay_failed(outcome: Replay) -> None:
    assert outcome.sqlstate == "OC004" or (outcome.sqlstate is None and outcome.returned is not None), outcome
    assert (outcome.active_user, outcome.title) == (None, PLACEHOLDER), outcome


@pytest.mark.pgbouncer
@pytest.mark.parametrize("victim_ends", ["commit", "rollback"])
def test_replayed_activation_activates_nothing(site: Site, people: People, scene: Scene,
                                               tiny_pgbouncer: devdb.Server, victim_ends: str) -> None:
    """Finding 6b (replay). The attacker holds the application role and a log with full bind parameters.

    Alice connects as the adapter does (transport established and committed), activates and reads through
    PgBouncer (one backend for the whole pool), then commits or rolls back. The
    attacker replays her logged activate() calls verbatim: through PgBouncer on her very backend, again after
    DISCARD ALL, and on a direct connection (another backend). Each gets OC004 or a fresh transport entry; no user
    is active and her chat reads as the placeholder.
    """
    site.configure(LOG_PARAMETERS)
    pooled = site.url(site.roles.app, via=tiny_pgbouncer)
    window = LogWindow(site.log_path())
    with psycopg.connect(pooled, prepare_threshold=None) as victim:
        transport = Transport()
        with victim.cursor() as cur:  # as the adapter's connect hook: the entry outlives what follows
            transport.establish(cur)
        victim.commit()
        people.activate(victim, scene.alice, transport=transport)
        title, victim_pid = victim.execute("SELECT title, pg_backend_pid() FROM chat WHERE id = %s",
                                           (scene.alice_chat,)).fetchone()
        getattr(victim, victim_ends)()
        calls = logged_activations(window.read(), site.log_database())
        assert title == CANARY_TITLE and calls
        with psycopg.connect(pooled, prepare_threshold=None, autocommit=True) as attacker:
            for call in calls:
                outcome = replay(attacker, call, scene.alice_chat)
                assert outcome.pid == victim_pid  # the same backend: PgBouncer's pool has one connection
                assert_replay_failed(outcome)
            attacker.execute("DISCARD ALL")
            for call in calls:
                assert_replay_failed(replay(attacker, call, scene.alice_chat))
    with psycopg.connect(site.app_url, autocommit=True) as direct:
        for call in calls:
            assert_replay_failed(replay(direct, call, scene.alice_chat))


# -- finding 7: owner checks ------------------------------------------------------------------------------------


def test_moving_another_users_message_into_own_chat_is_refused(site: Site, people: People, scene: Scene) -> None:
    """Finding 7. The attacker is Alice, through the views. Bob's message has only ``output`` set, so to her every
    sealed column reads NULL; moving it into her chat is still an owner change: OC007, nothing moves.
    """
    message_id = f"m-{uuid.uuid4()}"
    with site.app() as app:
        people.activate(app, scene.bob)
        app.execute("INSERT INTO chat_message (id, chat_id, user_id, role, output, created_at, updated_at)"
                    " VALUES (%s, %s, %s, 'assistant', %s, 0, 0)",
                    (message_id, scene.bob_chat, scene.bob, Json([{"type": "message", "content": "bob's output"}])))
        app.commit()
        before = site.snapshot()
        people.activate(app, scene.alice)
        assert app.execute("SELECT content, output FROM chat_message WHERE id = %s", (message_id,)).fetchone() == (
            None, None)
        outcome = attempt(app, "UPDATE chat_message SET chat_id = %s WHERE id = %s", (scene.alice_chat, message_id))
        app.commit()
    assert outcome.sqlstate == "OC007"
    assert site.snapshot() == before


# Who runs it ("app": the application role through the views; "owui": Open WebUI's own role on the base tables).
OWNER_CHANGES = {
    "view: Alice gives her chat to Bob": ("app", "UPDATE chat SET user_id = %(bob)s WHERE id = %(alice_chat)s"),
    "view: Alice takes Bob's chat": ("app", "UPDATE chat SET user_id = %(alice)s WHERE id = %(bob_chat)s"),
    "base: chat.user_id": ("owui", "UPDATE public.chat SET user_id = %(bob)s WHERE id = %(alice_chat)s"),
    "base: chat_message.chat_id": (
        "owui", "UPDATE public.chat_message SET chat_id = %(alice_chat)s WHERE chat_id = %(bob_chat)s"),
    "base: shared_chat.chat_id": (
        "owui", "UPDATE public.shared_chat SET chat_id = %(bob_chat)s WHERE chat_id = %(alice_chat)s"),
}


@pytest.mark.parametrize("change", list(OWNER_CHANGES))
def test_moving_a_row_to_another_owner_is_refused(site: Site, people: People, scene: Scene, change: str) -> None:
    """Finding 7. The attacker is Alice (her key active) through the views, or Open WebUI's own role on the base
    tables: any change of a row's owner (chat.user_id, a message's or a share's chat) is OC007, nothing changes.
    """
    role, statement = OWNER_CHANGES[change]
    before = site.snapshot()
    with site.app() if role == "app" else site.owui() as conn:
        people.activate(conn, scene.alice)
        outcome = attempt(conn, statement, {"alice": scene.alice, "bob": scene.bob,
                                            "alice_chat": scene.alice_chat, "bob_chat": scene.bob_chat})
        conn.commit()
    assert outcome.sqlstate == "OC007"
    assert site.snapshot() == before


@pytest.mark.parametrize("actor", ["Alice", "nobody"])
def test_deleting_another_users_rows_through_the_view_is_refused(site: Site, people: People, scene: Scene,
                                                                 actor: str) -> None:
    """Finding 7. The attacker holds the application role, acting as Alice or with no key: deleting Bob's chat or
    his message through the views is OC002, and both are still there.
    """
    before = site.snapshot()
    with site.app() as app:
        people.activate(app, scene.alice if actor == "Alice" else None)
        outcomes = [attempt(app, "DELETE FROM chat_message WHERE id = %s", (scene.bob_message,)),
                    attempt(app, "DELETE FROM chat WHERE id = %s", (scene.bob_chat,))]
        app.commit()
    assert [o.sqlstate for o in outcomes] == ["OC002", "OC002"]
    assert site.snapshot() == before


def test_a_verified_admin_deletes_another_users_chat(site: Site, people: People, scene: Scene) -> None:
    """Finding 7 (behaviour kept). An Open WebUI admin ("user".role = 'admin', their key active) deletes Bob's chat
    through the view, as Open WebUI's admin chat management does.
    """
    admin = people.user(role="admin")
    with site.app() as app:
        people.activate(app, admin)
        deleted = app.execute("DELETE FROM chat WHERE id = %s RETURNING id", (scene.bob_chat,)).fetchall()
        app.commit()
    assert deleted == [(scene.bob_chat,)]
    with site.owner() as owner:
        assert owner.execute("SELECT count(*) FROM public.chat WHERE id = %s", (scene.bob_chat,)).fetchone() == (0,)


# Columns whose placeholder is not NULL: to Alice, NULL is a change. (Where the placeholder is NULL, e.g.
# chat.summary, "SET summary = NULL" is what she already reads: the view keeps the stored value, nothing changes.)
@pytest.mark.parametrize(("table", "column"), [("chat", "title"), ("chat", "chat"), ("chat_message", "content")])
def test_nulling_another_users_sealed_column_is_refused(site: Site, people: People, scene: Scene, table: str,
                                                        column: str) -> None:
    """Finding 7. The attacker is Alice through the views: setting a sealed column of Bob's row to NULL needs no
    key to compute, but is still a write of his content: OC002, nothing changes.
    """
    row_id = scene.bob_chat if table == "chat" else scene.bob_message
    before = site.snapshot()
    with site.app() as app:
        people.activate(app, scene.alice)
        outcome = attempt(app, sql.SQL("UPDATE {} SET {} = NULL WHERE id = %s").format(
            sql.Identifier(table), sql.Identifier(column)), (row_id,))
        app.commit()
    assert outcome.sqlstate == "OC002"
    assert site.snapshot() == before


# -- finding 8: privileges and `owui-crypto check` ----------------------------------------------------------------

# (what, extension member?, privilege) for every grant to PUBLIC (grantee 0) on owui_crypto's objects. A NULL acl is
# the default, which for functions and types includes PUBLIC. Array types take their element's privileges.
PUBLIC_GRANTS = """
WITH objects (what, member, acl) AS (
    SELECT 'function ' || p.oid::regprocedure::text,
           EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                             AND d.deptype = 'e'),
           coalesce(p.proacl, acldefault('f', p.proowner))
      FROM pg_proc p WHERE p.pronamespace IN ('owui_crypto'::regnamespace, 'owui_crypto_view'::regnamespace)
    UNION ALL
    SELECT 'relation ' || c.oid::regclass::text, false,
           coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's'::"char" ELSE 'r'::"char" END, c.relowner))
      FROM pg_class c WHERE c.relnamespace IN ('owui_crypto'::regnamespace, 'owui_crypto_view'::regnamespace)
       AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    UNION ALL
    SELECT 'type ' || t.oid::regtype::text, false, coalesce(t.typacl, acldefault('T', t.typowner))
      FROM pg_type t WHERE t.typnamespace IN ('owui_crypto'::regnamespace, 'owui_crypto_view'::regnamespace)
       AND NOT (t.typelem <> 0 AND t.typsubscript = 'array_subscript_handler'::regproc)
    UNION ALL
    SELECT 'schema ' || n.nspname, false, coalesce(n.nspacl, acldefault('n', n.nspowner))
      FROM pg_namespace n WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view')
)
SELECT o.what, o.member, a.privilege_type FROM objects o, aclexplode(o.acl) a WHERE a.grantee = 0 ORDER BY 1, 3
"""


def public_grants(site: Site, *, extension_members: bool) -> list[tuple[str, str]]:
    with site.owner() as owner:
        return [(what, privilege) for what, member, privilege in owner.execute(PUBLIC_GRANTS)
                if member == extension_members]


def test_nothing_of_owui_crypto_is_granted_to_public(site: Site) -> None:
    """Finding 8. Any role of the cluster (PUBLIC) holds no privilege on any function, table, view, sequence, type
    (table and view row types included: they carry their own ACL) or schema that owui-crypto made, in a database
    installed by an owner that is not a superuser.
    """
    assert public_grants(site, extension_members=False) == []


def test_pgcrypto_functions_are_out_of_reach_of_public(site: Site) -> None:
    """Finding 8 (pgcrypto). A non-superuser owner installs pgcrypto as a trusted extension: its functions belong
    to the bootstrap superuser, whose default EXECUTE for PUBLIC the owner cannot revoke (the README says so).
    What must hold instead: PUBLIC has no USAGE on owui_crypto, so a role without a grant calls none of them.
    """
    members = public_grants(site, extension_members=True)
    assert members and {privilege for _, privilege in members} == {"EXECUTE"}
    with site.owner() as owner:
        assert owner.execute("SELECT pg_get_userbyid(p.proowner) <> current_user FROM pg_proc p"
                             " WHERE p.oid = 'owui_crypto.gen_random_bytes(integer)'::regprocedure").fetchone()[0]
    with site.ro() as ro, pytest.raises(psycopg.errors.InsufficientPrivilege):
        ro.execute("SELECT owui_crypto.gen_random_bytes(16)")


def test_every_security_definer_function_pins_pg_catalog_then_pg_temp(site: Site) -> None:
    """Finding 8. Every SECURITY DEFINER function of owui_crypto runs with search_path = pg_catalog, pg_temp, so no
    object of the caller's (a temporary one included) resolves in it.
    """
    with site.owner() as owner:
        definers = owner.execute("SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p"
                                 " WHERE p.pronamespace = 'owui_crypto'::regnamespace AND p.prosecdef").fetchall()
    assert definers
    assert [(f, c) for f, c in definers if "search_path=pg_catalog, pg_temp" not in (c or [])] == []


def run_check(site: Site, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["check", "--database-url", site.owner_url])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_check_reports_auto_explain_even_without_parameter_logging(site: Site,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 8. The attacker reads the server log. auto_explain logging every plan (log_min_duration = 0) prints
    the values a plan was made for, whatever log_parameter_max_length says: `owui-crypto check` names it, exit 1.
    """
    site.configure({"log_parameter_max_length": "0", "log_error_verbosity": "terse"})
    assert "auto_explain" not in run_check(site, capsys)[1]
    site.configure({"session_preload_libraries": "auto_explain", "auto_explain.log_min_duration": "0"})
    code, output = run_check(site, capsys)
    assert code == 1 and "auto_explain" in output, output


def test_check_reports_error_verbosity_that_quotes_values(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 8. The attacker reads the server log. log_error_verbosity other than terse logs DETAIL and CONTEXT
    lines, which quote row values of failed statements: `owui-crypto check` names it, exit 1.
    """
    site.configure({"log_parameter_max_length": "0", "log_error_verbosity": "terse"})
    assert "log_error_verbosity" not in run_check(site, capsys)[1]
    site.configure({"log_error_verbosity": "verbose"})
    code, output = run_check(site, capsys)
    assert code == 1 and "log_error_verbosity" in output, output


# -- our own -----------------------------------------------------------------------------------------------------

FORGED = ("SELECT pg_catalog.set_config('owui_crypto.user_id', %s, true),"
          " pg_catalog.set_config('owui_crypto.user_key_id', %s, true),"
          " pg_catalog.set_config('owui_crypto.user_key', %s, true)")


@pytest.mark.parametrize("forgery", ["Alice's key id, a chosen key", "Bob's own key, Alice's id"])
def test_forged_acting_user_reads_and_writes_nothing(site: Site, people: People, scene: Scene, forgery: str) -> None:
    """Own. The attacker holds the application role (or is Bob, with his own key active) and sets the key settings
    by hand: Alice's user id with her key id (from any envelope) and a key they chose, or with Bob's real key.
    Reading her chat gives placeholders or OC003, never plaintext; writing or deleting her rows is OC002/OC005 (or
    OC003 where the view must first open her row with the forged key), and nothing changes.
    """
    if forgery.startswith("Bob"):
        forged_key_id, forged_key = key_id(people, scene.bob), people.keys[scene.bob]
    else:
        forged_key_id, forged_key = key_id(people, scene.alice), os.urandom(32)
    before = site.snapshot()
    with site.app() as app:
        people.activate(app, scene.bob if forgery.startswith("Bob") else None)
        app.execute(FORGED, (scene.alice, forged_key_id, forged_key.hex()))
        reads = [attempt(app, "SELECT title FROM chat WHERE id = %s", (scene.alice_chat,)),
                 attempt(app, "SELECT string_agg(content::text, ' ') FROM chat_message WHERE chat_id = %s",
                         (scene.alice_chat,))]
        writes = [attempt(app, "UPDATE chat SET title = 'forged' WHERE id = %s", (scene.alice_chat,)),
                  attempt(app, "UPDATE chat_message SET content = '\"forged\"' WHERE chat_id = %s",
                          (scene.alice_chat,)),
                  attempt(app, "INSERT INTO chat_message (id, chat_id, user_id, role, content) VALUES"
                               " ('m-forged', %s, %s, 'user', '\"forged\"')", (scene.alice_chat, scene.alice)),
                  attempt(app, "DELETE FROM chat WHERE id = %s", (scene.alice_chat,))]
        app.commit()
    for outcome in reads:
        leaked = CANARY_TITLE in str(outcome.row) or CANARY_TEXT in str(outcome.row)
        assert outcome.sqlstate == "OC003" or (outcome.sqlstate is None and not leaked), outcome
    # OC003: the view had to open her row (to form OLD) with the forged key, and its integrity check refused.
    assert [o.sqlstate for o in writes if o.sqlstate not in ("OC002", "OC003", "OC005")] == [], writes
    assert site.snapshot() == before
    assert title_of(site, people, scene.alice, scene.alice_chat) == CANARY_TITLE


def test_app_role_cannot_forget_a_live_users_key(site: Site, people: People, scene: Scene) -> None:
    """Own. The attacker holds the application role and calls owui_crypto.forget_user_key() for Alice, who still
    exists: refused, her key registration and wrapped keys stay, and she still reads her chat.
    """
    with site.app() as app:
        outcome = attempt(app, "SELECT owui_crypto.forget_user_key(%s)", (scene.alice,))
        app.commit()
    assert outcome.sqlstate in ("OC002", "42501"), outcome
    with site.owner() as owner:
        assert owner.execute("SELECT count(*) FROM owui_crypto.user_key WHERE user_id = %s",
                             (scene.alice,)).fetchone() == (1,)
    assert title_of(site, people, scene.alice, scene.alice_chat) == CANARY_TITLE


def test_app_role_cannot_replace_a_users_key(site: Site, people: People, scene: Scene) -> None:
    """Own (behaviour kept). The attacker holds the application role and registers a key of their own for Alice:
    OC020; their key does not activate as her (OC005), and hers still does.
    """
    chosen = os.urandom(32)
    with site.app() as app:
        outcome = attempt(app, "SELECT owui_crypto.register_user_key(%s, %s)",
                          (scene.alice, userkeys.fingerprint(chosen)))
        app.commit()
        with pytest.raises(psycopg.Error) as excinfo:
            people.offer(app, scene.alice, chosen)
        app.rollback()
    assert outcome.sqlstate == "OC020"
    assert excinfo.value.sqlstate == "OC005"
    assert title_of(site, people, scene.alice, scene.alice_chat) == CANARY_TITLE


def test_read_only_role_reads_only_ciphertext(site: Site, people: People, kms_service: KeyService) -> None:
    """Own. The attacker holds a read-only role (SELECT on Open WebUI's tables). Base tables give ciphertext only;
    nothing in "user" (salt, user_encrypted_dek, user_key, kms_encrypted_dek) derives or opens a DEK without KMS;
    the key ring, the views and activate() are permission denied.
    """
    alice = f"alice-{uuid.uuid4()}"
    provision(site, kms_service, people, alice)
    with site.app() as app:
        people.activate(app, alice)
        insert_chat(app, alice, CANARY_TITLE, [("user", CANARY_TEXT)])
        app.commit()
    with site.ro() as ro:
        stored = str(ro.execute("SELECT title, chat::text, summary FROM public.chat").fetchall()) + str(
            ro.execute("SELECT content::text FROM public.chat_message").fetchall())
        users = [dict(zip(["id", "email", "name", "salt", "user_encrypted_dek", "user_key", "kms_encrypted_dek"], row,
                          strict=True))
                 for row in ro.execute('SELECT id, email, name, salt, user_encrypted_dek, user_key, kms_encrypted_dek'
                                       ' FROM public."user"')]
        denied = [attempt(ro, f"SELECT * FROM {relation}") for relation in (
            "owui_crypto.user_key", "owui_crypto.deployment_key", "owui_crypto_view.chat",
            "owui_crypto_view.chat_message", "owui_crypto_view.shared_chat")]
        denied.append(attempt(ro, "SELECT owui_crypto.activate(NULL, '{}', '{}', '{}')"))
    assert "oc1:" in stored and CANARY_TITLE not in stored and CANARY_TEXT not in stored
    assert users and user_key_derivations(users)[1] == []
    assert [o.sqlstate for o in denied] == ["42501"] * len(denied)


def test_app_role_cannot_touch_owui_crypto_internals(site: Site, people: People, scene: Scene) -> None:
    """Own. The attacker holds the application role after a keyed transaction on its session. Every table and
    sequence of owui_crypto, and every temporary one owui-crypto keeps in the session, is permission denied
    (42501) to read, to write and, for sequences, to set.
    """
    with site.owner() as owner:
        internal = owner.execute("SELECT c.oid::regclass::text, c.relkind FROM pg_class c"
                                 " WHERE c.relnamespace = 'owui_crypto'::regnamespace"
                                 " AND c.relkind IN ('r', 'p', 'S', 'v', 'm')").fetchall()
    with site.app() as app:
        people.activate(app, scene.alice)
        app.commit()
        temporary = app.execute("SELECT c.oid::regclass::text, c.relkind FROM pg_class c"
                                " WHERE c.relnamespace = pg_my_temp_schema() AND c.relkind IN ('r', 'S')"
                                " AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)").fetchall()
        outcomes = {}
        for relation, kind in internal + temporary:
            outcomes[f"read {relation}"] = attempt(app, f"SELECT * FROM {relation}")
            write = "SELECT pg_catalog.setval(%s::regclass, 1)" if kind == "S" else f"DELETE FROM {relation}"
            outcomes[f"write {relation}"] = attempt(app, write, (relation,) if kind == "S" else ())
        app.rollback()
    assert internal
    assert {what: o for what, o in outcomes.items() if o.sqlstate != "42501"} == {}


TROJAN = [
    "CREATE TABLE public.loot (k text)",
    "CREATE FUNCTION public.trojan_eq(a varchar, b varchar) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO public.loot VALUES (current_setting('owui_crypto.user_key', true)); RETURN a::text = b::text; END $$",
    "CREATE OPERATOR public.= (FUNCTION = public.trojan_eq, LEFTARG = varchar, RIGHTARG = varchar)",
]


def test_code_planted_in_public_is_refused_after_grant_and_reported(site: Site, people: People, scene: Scene,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Found while hardening. The attacker holds the application role on a server where it may create objects in
    schema public (PUBLIC's default up to PostgreSQL 14). An operator planted there runs inside every later user's
    keyed transaction that compares two varchars, and reads that user's key. `owui-crypto grant` revokes CREATE on
    public (42501 for the attacker), and `owui-crypto check` names any role that could still do it.
    """
    with site.owner() as owner:
        owner.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(site.roles.app)))
    code, output = run_check(site, capsys)
    assert code == 1 and f"{site.roles.app} may create objects in schema public" in output, output
    with site.app() as app:
        for statement in TROJAN:
            app.execute(statement)
        app.commit()
        people.activate(app, scene.alice)
        app.execute("SELECT 1 FROM chat WHERE id::varchar = %s::varchar", (scene.alice_chat,))
        app.commit()
        assert app.execute("SELECT count(*) FROM public.loot WHERE k <> ''").fetchone()[0] > 0  # the attack works
        app.execute("DROP OPERATOR public.= (varchar, varchar); DROP FUNCTION public.trojan_eq; DROP TABLE public.loot")
        app.commit()
    assert cli.main(["grant", site.roles.app, "--database-url", site.owner_url]) == 0
    capsys.readouterr()
    with site.app() as app:
        assert attempt(app, TROJAN[0]).sqlstate == "42501"
    assert "may create objects" not in run_check(site, capsys)[1]
