"""``owui-crypto serve``: the installed Open WebUI, with owui-crypto in place.

In order, and stopping at the first problem with a message that says what to
change:

1. refuse what owui-crypto cannot protect: an unsupported open-webui, SQLite,
   psycopg2, ``DATABASE_SCHEMA``, several uvicorn workers in one process (the
   hooks live in this process), no ``WEBUI_SECRET_KEY``; check the KMS keys;
2. run Open WebUI's own migrations (its own NullPool engine, plain
   search_path) with the decrypting views kept in place for the instances
   still serving (:mod:`app_adapter.owui.migrating`), then owui-crypto's
   (``alembic upgrade head`` + view refresh), and refuse to start on any drift
   between views and tables;
3. give keys to users who have none, forget keys of users who are gone;
   with two roles (:data:`OWNER_URL_ENV`), steps 2 and 3 run as the owner,
   which then grants the application role (DATABASE_URL's user) exactly what
   Open WebUI needs, after refusing a role that could act as the owner; the
   owner's connection is not used again;
4. import Open WebUI -- with ``ENABLE_DB_MIGRATIONS=false``, its migrations
   are done -- check the shape of everything about to be wrapped, then
   install every hook (nothing is installed if a check fails);
5. serve ``open_webui.main:app`` with uvicorn.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from app_adapter import aurora, cli, config, iam, migrate
from app_adapter.errors import ConfigError
from app_adapter.owui import compat, migrating

#: Variables from which Open WebUI builds a database URL that overrides DATABASE_URL (env.py:273-294).
_URL_PARTS = ("DATABASE_TYPE", "DATABASE_USER", "DATABASE_HOST", "DATABASE_PORT", "DATABASE_NAME")


class ServeRefused(ConfigError):
    """A setting owui-crypto cannot protect; the message says what to change."""


def say(message: str) -> None:
    print(f"owui-crypto: {message}", file=sys.stderr, flush=True)


#: The owner's connection (README, "Two roles"): Open WebUI's and owui-crypto's migrations, the checks and the
#: grants run with it at start; Open WebUI itself then connects as DATABASE_URL's role, never as this one.
OWNER_URL_ENV = config.OWNER_URL_ENV
#: The owner's RDS secret (its ARN), which serve reads itself: the deployment kit gives the owner's password so.
OWNER_SECRET_ENV = config.OWNER_SECRET_ENV

ONE_ROLE_WARNING = (
    f"warning: one database role for everything ({OWNER_URL_ENV} is not set): Open WebUI connects as the role "
    "that migrates and owns owui-crypto's functions and the schema public, so SQL injected into Open WebUI runs "
    "as that owner and could replace owui-crypto's functions or plant code in public, then read the keys of the "
    "users whose transactions follow (SECURITY.md, 'One role for everything'). Set "
    f"{OWNER_URL_ENV} to the owner's URL and DATABASE_URL to a login role of its own: serve then migrates as "
    "the owner, grants that role what Open WebUI needs, and serves as it")


@dataclass(frozen=True)
class Plan:
    database_url: str  # postgresql+psycopg://, Open WebUI's: the application role's
    owui_version: str
    run_owui_migrations: bool
    #: OWUI_CRYPTO_OWNER_DATABASE_URL (postgresql+psycopg://), None with one role. It may carry the owner's
    #: password: out of the environment from plan() on, never shown, used only before Open WebUI is imported.
    owner_url: str | None = field(default=None, repr=False)

    @property
    def migrating_url(self) -> str:
        """The URL migrations, checks and grants run with."""
        return self.owner_url or self.database_url


def normalise_database_url(url: str | None, name: str = "DATABASE_URL") -> str:
    """The SQLAlchemy URL Open WebUI must use, or :class:`ServeRefused` saying what to change."""
    if not url:
        raise ServeRefused("DATABASE_URL is not set, so Open WebUI would use SQLite. Set DATABASE_URL="
                           "postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME")
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        raise ServeRefused(f"{name} is {scheme}:...: owui-crypto encrypts inside PostgreSQL and cannot protect "
                           f"SQLite. Move Open WebUI to PostgreSQL and set {name}=postgresql+psycopg://...")
    if "psycopg2" in scheme or scheme in ("postgresql+pg8000", "postgresql+asyncpg"):
        raise ServeRefused(f"{name} uses {scheme}: that driver inlines parameters into SQL text, where keys and "
                           "chat text reach the server's logs. Use postgresql+psycopg:// (psycopg 3)")
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ServeRefused(f"{name} is {scheme}:...: owui-crypto needs PostgreSQL (postgresql+psycopg://...)")


def owner_database_url(environ: MutableMapping[str, str]) -> str | None:
    """:data:`OWNER_URL_ENV`, taken OUT of ``environ`` (Open WebUI, imported later, must not find the owner's
    password in its environment), checked as DATABASE_URL is, with TLS settled (:func:`aurora.settle_other_role`).
    With :data:`OWNER_SECRET_ENV` (also taken out), the owner's password and what the URL leaves out come from that
    RDS secret, read now with the process's role. None when neither is set: one role, as before."""
    raw = (environ.pop(OWNER_URL_ENV, None) or "").strip() or None
    arn = (environ.pop(OWNER_SECRET_ENV, None) or "").strip() or None
    if raw is None and arn is None:
        return None
    if environ.get("PGPASSWORD"):
        named = OWNER_SECRET_ENV if raw is None else OWNER_URL_ENV
        raise ServeRefused(f"PGPASSWORD is set beside {named}: libpq would hand it to both roles' "
                           "connections, and it would stay in Open WebUI's environment. Unset it; give the owner's "
                           f"password in {OWNER_URL_ENV} (or ~/.pgpass, or {OWNER_SECRET_ENV}) and the application "
                           f"role's in DATABASE_URL, {aurora.DB_SECRET_ENV} or IAM authentication")
    if arn is not None:
        if raw is not None:
            raw = normalise_database_url(raw, OWNER_URL_ENV)  # its scheme refused before the secret is read
        raw = aurora.owner_url_from_secret(raw, iam.secret_arn(arn, OWNER_SECRET_ENV), OWNER_URL_ENV,
                                           OWNER_SECRET_ENV)
    url = normalise_database_url(raw, OWNER_URL_ENV)
    return normalise_database_url(aurora.settle_other_role(url, OWNER_URL_ENV, environ), OWNER_URL_ENV)


def plan(environ: MutableMapping[str, str]) -> Plan:
    """Check the environment and prepare it for Open WebUI; nothing is imported or connected yet."""
    owner_url = owner_database_url(environ)  # first: out of the environment whatever else is refused
    version = compat.check_version()
    if all(environ.get(name) for name in _URL_PARTS):
        raise ServeRefused("DATABASE_TYPE/DATABASE_USER/DATABASE_HOST/DATABASE_PORT/DATABASE_NAME are all set, and "
                           "Open WebUI would build its database URL from them: unset them and give the whole URL in "
                           "DATABASE_URL=postgresql+psycopg://...")
    # Secret, IAM tokens, verify-full (README, "Connecting to Aurora"): a password-free DATABASE_URL for Open WebUI
    # and the connect hooks in place, before anything connects or imports Open WebUI.
    url = normalise_database_url(aurora.configure(environ))
    if environ.get("DATABASE_SCHEMA"):
        raise ServeRefused(f"DATABASE_SCHEMA={environ['DATABASE_SCHEMA']!r} is set: Open WebUI would then name its "
                           "tables with that schema and bypass the decrypting views. Unset it and keep Open WebUI's "
                           "tables in the public schema (a separate database per deployment isolates just as well)")
    workers = environ.get("UVICORN_WORKERS", "1").strip() or "1"
    if workers not in ("1", "0"):
        raise ServeRefused(f"UVICORN_WORKERS={workers}: owui-crypto's hooks live in this one process. Set "
                           "UVICORN_WORKERS=1 and run more containers (or processes) instead")
    if not (environ.get("WEBUI_SECRET_KEY") or environ.get("WEBUI_JWT_SECRET_KEY")):
        raise ServeRefused("WEBUI_SECRET_KEY is not set: Open WebUI signs sessions with it. Set it to a long random "
                           "value shared by every instance (e.g. from AWS Secrets Manager)")
    run_owui = environ.get("ENABLE_DB_MIGRATIONS", "true").lower() == "true"
    environ["DATABASE_URL"] = url
    environ["ENABLE_DB_MIGRATIONS"] = "false"  # ours run them first, below; Open WebUI must not at import
    if compat.installed_from_wheel():
        environ.setdefault("FROM_INIT_PY", "true")  # as `open-webui serve` does for a pip install
    return Plan(url, version, run_owui, owner_url)


def owui_alembic_config() -> Any:
    from alembic.config import Config
    from open_webui.env import OPEN_WEBUI_DIR  # imported only now: the environment is prepared

    config = Config(str(OPEN_WEBUI_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(OPEN_WEBUI_DIR / "migrations"))
    return config


def run_owui_migrations() -> None:
    """Open WebUI's alembic project, exactly as it would run it at import (config.py:65-83)."""
    from alembic import command

    command.upgrade(owui_alembic_config(), "head")


ACCEPT_UNCLASSIFIED = "OWUI_CRYPTO_ACCEPT_UNCLASSIFIED"


def check_drift(url: str, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse to serve when the views do not match the tables, or when Open WebUI has a text or JSON
    column the policy has not decided on (a new release): it would keep a user's words in plaintext."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True) as conn:
        drift = conn.execute("SELECT table_name, problem FROM owui_crypto.drift()").fetchall()
        unclassified = [f"{t}.{c}" for t, c, _ in conn.execute("SELECT * FROM owui_crypto.unclassified_columns()")]
    if drift:
        raise ServeRefused("the decrypting views do not match Open WebUI's tables after migrating:\n  - "
                           + "\n  - ".join(f"{t or 'owui_crypto'}: {p}" for t, p in drift)
                           + "\nRun `owui-crypto refresh` and check sql/40_policy.sql against this Open WebUI release")
    accepted = {c.strip() for c in environ.get(ACCEPT_UNCLASSIFIED, "").split(",") if c.strip()}
    if undecided := [c for c in unclassified if c not in accepted]:
        raise ServeRefused(f"Open WebUI has {len(undecided)} text or JSON column(s) that owui-crypto's policy neither "
                           f"seals nor keeps plaintext by decision: {', '.join(undecided)}. Whatever it writes there "
                           "stays plaintext. Add them to the policy (sealed, or owui_crypto.plaintext_column with a "
                           f"reason), or start once with {ACCEPT_UNCLASSIFIED}={','.join(undecided)}")


def _unprepared(dbapi_connection: Any, _record: Any) -> None:
    """psycopg prepares a statement on the server after its fifth run; behind a pooler in transaction mode the
    next run may reach another backend (``prepared statement "_pg3_0" does not exist``)."""
    connection = getattr(dbapi_connection, "driver_connection", dbapi_connection)  # the asyncio adapter's inside
    connection.prepare_threshold = None


def serve(host: str, port: int) -> int:
    started = time.monotonic()
    steps = plan(os.environ)
    say(f"open-webui {steps.owui_version} (supported: {compat.SUPPORTED})")
    if (database := aurora.describe()) is not None:
        say(database)
    if steps.owner_url is None:
        say(ONE_ROLE_WARNING)

    from app_adapter.config import Settings
    from app_adapter.keys import KeyService

    settings = Settings.from_env()
    keys = KeyService(settings, steps.database_url)
    from app_adapter import metrics

    exporter = metrics.start(settings, keys)  # first: a port in use stops the start now, not after a minute
    if exporter is not None:
        say(f"Prometheus metrics on {exporter.url}")
    say(f"KMS keys: {keys.kms.check_keys()}")

    if os.environ.get(config.TRANSACTION_POOLER_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        # On every pool, before the migrations' engines and Open WebUI's exist (its import already runs queries).
        from sqlalchemy import event, pool

        event.listen(pool.Pool, "connect", _unprepared)
        say(f"{config.TRANSACTION_POOLER_ENV}: psycopg's server-side prepared statements are off")
    try:
        prepare_database(steps, keys)
    finally:  # done with the owner's URL: nothing of this process keeps it once Open WebUI is imported
        if steps.owner_url is not None:
            aurora.forget_other_role(steps.owner_url)
        steps = Plan(steps.database_url, steps.owui_version, steps.run_owui_migrations)

    imported = time.monotonic()
    import open_webui.main  # noqa: F401 - Open WebUI builds its app at import

    say(f"Open WebUI imported in {time.monotonic() - imported:.1f} s")
    compat.check_shapes()
    app = install(keys)
    if exporter is not None:
        from app_adapter.owui import responses

        exporter.collector.attach(app.state.owui_crypto["adapter"], responses.refusal_counts)
    say(f"hooks installed; ready to serve after {time.monotonic() - started:.1f} s")

    import uvicorn
    from open_webui.env import UVICORN_WS_PER_MESSAGE_DEFLATE

    uvicorn.run(app, host=host, port=port, forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "*"),
                ws_per_message_deflate=UVICORN_WS_PER_MESSAGE_DEFLATE)
    return 0


def prepare_database(steps: Plan, keys: Any) -> None:
    """Migrations, checks, keys and (two roles) the application role's grants: everything that needs the owner.

    With two roles the application role is looked at first, so that a role that could act as the owner is refused
    before anything changes, and once more after the grants, right before Open WebUI is imported."""
    owner = steps.migrating_url
    app_role = checked_application_role(steps.database_url, steps.owner_url) if steps.owner_url else None
    if app_role is not None:
        say(f"two roles: migrating as the owner ({OWNER_URL_ENV}), serving Open WebUI as {app_role} (DATABASE_URL)")
    if steps.run_owui_migrations:
        say("running Open WebUI's migrations")
        step = time.monotonic()
        # Other instances keep serving meanwhile: each view Open WebUI's DDL touches is rebuilt inside its
        # transaction, never dropped where they could see it (app_adapter/owui/migrating.py).
        with migrating.views_kept(owner) as kept, owui_migrations_as(steps.owner_url):
            run_owui_migrations()
        rebuilt = sorted(kept.rebuilt) if kept is not None else []
        say(f"Open WebUI's migrations done in {time.monotonic() - step:.1f} s"
            + (f"; rebuilt the decrypting views of {', '.join(rebuilt)} in their transaction" if rebuilt else ""))
    else:
        say("ENABLE_DB_MIGRATIONS=false: not running Open WebUI's migrations")
    say("running owui-crypto's migrations")
    step = time.monotonic()
    migrate.upgrade(owner)
    check_drift(owner)
    say(f"owui-crypto's migrations done in {time.monotonic() - step:.1f} s")

    from app_adapter.keys import KeyService
    from app_adapter.owui.lifecycle import reconcile

    # The share key is registered, and reconcile reads the key ring, as the owner: before the application role is
    # granted anything, nothing of it can register the deployment's share key first.
    owning = keys if app_role is None else KeyService(keys.settings, owner, kms=keys.kms, cache=keys.cache)
    owning.share_key()
    done = reconcile(owning)
    if done.provisioned or done.forgotten:
        say(f"gave keys to {len(done.provisioned)} user(s) without one; forgot keys of {len(done.forgotten)} "
            "deleted user(s)")
    if done.weak_copies_removed:
        say(f"removed key copies the database could open (wrapped under the user id by earlier releases) of "
            f"{len(done.weak_copies_removed)} user(s); their KMS copies hold the same keys")
    if app_role is not None:
        assert steps.owner_url is not None
        tables = grant_application_role(owner, app_role)
        checked_application_role(steps.database_url, steps.owner_url)
        say(f"granted {app_role} the decrypting views, owui-crypto's runtime functions and Open WebUI's {tables} "
            "other tables (no TEMP, no CREATE in public)")
        keys.share_key()  # as the application role, as every later use


# -- two roles --------------------------------------------------------------------------------------------


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def owui_migrations_as(owner_url: str | None) -> Iterator[None]:
    """Open WebUI's migrations connect with ``open_webui.env.DATABASE_URL`` (read by its ``migrations/env.py`` at
    each run): the owner's URL for their duration, DATABASE_URL's again afterwards. Its runtime engines are made
    first (``open_webui.internal.db``, at import), from DATABASE_URL, so they never see the owner's."""
    if owner_url is None:
        yield
        return
    import open_webui.env as owui_env
    import open_webui.internal.db  # noqa: F401 - its engines, from DATABASE_URL, before the swap

    served = owui_env.DATABASE_URL
    owui_env.DATABASE_URL = owner_url
    try:
        yield
    finally:
        owui_env.DATABASE_URL = served


#: What DATABASE_URL's role may be and own, asked as that role. Membership (not just inheritance): a role that may
#: SET ROLE to an owner can do what the owner does.
_APP_ROLE = """
SELECT current_user::text, r.rolsuper, current_database()::text, d.oid::bigint, pg_catalog.pg_postmaster_start_time(),
       pg_catalog.pg_has_role(d.datdba, 'MEMBER'),
       (SELECT pg_catalog.pg_has_role(n.nspowner, 'MEMBER') FROM pg_catalog.pg_namespace n WHERE n.nspname = 'public'),
       ARRAY(SELECT n.nspname::text FROM pg_catalog.pg_namespace n
              WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view') AND pg_catalog.pg_has_role(n.nspowner, 'MEMBER')
              ORDER BY 1),
       ARRAY(SELECT DISTINCT n.nspname::text FROM pg_catalog.pg_proc f
               JOIN pg_catalog.pg_namespace n ON n.oid = f.pronamespace
              WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view', 'public')
                AND pg_catalog.pg_has_role(f.proowner, 'MEMBER') ORDER BY 1),
       ARRAY(SELECT c.oid::regclass::text FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view', 'public')
                AND c.relkind IN ('r', 'p', 'v', 'S', 'm')
                AND pg_catalog.pg_has_role(c.relowner, 'MEMBER') ORDER BY 1 LIMIT 5)
  FROM pg_catalog.pg_roles r, pg_catalog.pg_database d
 WHERE r.rolname = current_user AND d.datname = current_database()
"""
_OWNER = ("SELECT current_user::text, current_database()::text, d.oid::bigint, pg_catalog.pg_postmaster_start_time(),"
          " pg_catalog.pg_has_role(%s, current_user, 'MEMBER')"
          " FROM pg_catalog.pg_database d WHERE d.datname = current_database()")


def checked_application_role(app_url: str, owner_url: str) -> str:
    """DATABASE_URL's role, or :class:`ServeRefused` when it could act as the owner: a superuser, a member of the
    owner's role, or the owner of the database, of schema public, of owui-crypto's schemas or functions, or of a
    table (a table's owner may disable its triggers). Also refused: the owner's URL naming another database."""
    with psycopg.connect(_libpq(app_url), autocommit=True) as conn:
        row = conn.execute(_APP_ROLE).fetchone()
    assert row is not None, "current_user and current_database() exist"
    role, superuser, database, oid, started, owns_db, owns_public, schemas, functions, relations = row
    with psycopg.connect(_libpq(owner_url), autocommit=True) as conn:
        owner_row = conn.execute(_OWNER, (role,)).fetchone()
    assert owner_row is not None
    owner, owner_database, owner_oid, owner_started, owner_is_member = owner_row
    fix = (f"Give Open WebUI a login role of its own that is none of these (CREATE ROLE owui_app LOGIN PASSWORD "
           f"'...', as the owner or an administrator) and name it in DATABASE_URL; keep {owner} for "
           f"{OWNER_URL_ENV}. serve grants it what Open WebUI needs at every start")
    if (database, oid, started) != (owner_database, owner_oid, owner_started):
        raise ServeRefused(f"DATABASE_URL and {OWNER_URL_ENV} name different databases ({database} and "
                           f"{owner_database}, or different servers): both must name Open WebUI's database")
    if role == owner:
        raise ServeRefused(f"DATABASE_URL and {OWNER_URL_ENV} both connect as {role}: Open WebUI would still run as "
                           f"the owner. {fix}")
    problems = []
    if superuser:
        problems.append("is a superuser")
    if owner_is_member:
        problems.append(f"is a member of the owner's role {owner} (it may SET ROLE {owner})")
    if owns_db:
        problems.append(f"owns the database {database} (it could grant itself TEMP and CREATE back)")
    if owns_public:
        problems.append("owns the schema public (it could create code there that runs inside other users' "
                        "keyed transactions)")
    if schemas:
        problems.append(f"owns {', '.join(schemas)}")
    if functions:
        problems.append(f"owns functions in {', '.join(functions)} (it could replace them)")
    if relations:
        problems.append(f"owns tables such as {', '.join(relations)} (it could disable their triggers); hand them "
                        f"to the owner with REASSIGN OWNED BY {role} TO {owner}, inside this database")
    if problems:
        raise ServeRefused(f"DATABASE_URL's role {role} " + "; ".join(problems) + ": SQL injected into Open WebUI "
                           f"would run with the owner's powers, and could read every later user's key. {fix}")
    return str(role)


#: Open WebUI's tables the application role must not write directly: the version tables (migrations are the
#: owner's). The protected tables (owui_crypto.protected_table) are reached through their views.
_VERSION_TABLES = ("alembic_version", migrate.VERSION_TABLE)


def grant_application_role(owner_url: str, role: str) -> int:
    """As the owner: ``owui-crypto grant ROLE`` (views, runtime functions, TEMP and CREATE on public revoked), then
    exactly what Open WebUI needs beyond the views: read and write its other tables in public, and INSERT (with
    SELECT of the ``id`` column, which ``ON CONFLICT (id)`` needs) on the base table ``chat_message``, where its
    message upsert goes (PostgreSQL refuses ``ON CONFLICT`` on a view; the base table's trigger seals and checks the
    owner). No sequence: Open WebUI 0.12.4's ids are text; its one sequence serves ``config_old``, which it no
    longer writes. Made exact at every start: whatever ROLE held on
    public's tables before is revoked first. Returns how many tables it may read and write."""
    with psycopg.connect(_libpq(owner_url)) as conn:
        cli.grant_application_role(conn, role)
        who = sql.Identifier(role)
        conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(who))
        conn.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {}").format(who))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(who))
        tables = [r[0] for r in conn.execute(
            """SELECT c.relname::text FROM pg_catalog.pg_class c
                WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
                  AND c.relowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)
                  AND c.relname <> ALL(%s)
                  AND c.relname NOT IN (SELECT p.table_name FROM owui_crypto.protected_table p)
                ORDER BY 1""", (list(_VERSION_TABLES),))]
        for table in tables:
            conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                sql.Identifier("public", table), who))
        # ON CONFLICT (id) needs SELECT on its arbiter column: the message ids, no content.
        conn.execute(sql.SQL("GRANT INSERT, SELECT (id) ON public.chat_message TO {}").format(who))
    return len(tables)


def install(keys: Any) -> Any:
    """Install every hook on the imported Open WebUI; returns the ASGI application to serve.

    Call only after :func:`compat.check_shapes` passed.
    """
    from open_webui.internal import db
    from open_webui.main import app
    from open_webui.models import auths, chat_messages, chats, users
    from open_webui.routers import automations as automations_router
    from open_webui.routers import chats as chats_router
    from open_webui.routers.audio import realtime
    from open_webui.socket import main as socket_main
    from open_webui.utils import auth, automations, timers

    from app_adapter.hook import Adapter
    from app_adapter.owui import binding, lifecycle, responses, statements

    adapter = Adapter(keys)
    upsert = statements.UpsertRetarget(chat_messages.ChatMessage.__table__)
    search = statements.SearchRewrite()
    for engine in (db.async_engine, db.engine):
        sync_engine = getattr(engine, "sync_engine", engine)
        sync_engine.hide_parameters = True  # errors and logs never show chat text bound as parameters
        adapter.install(engine)
        upsert.install(engine)
        search.install(engine)
        responses.watch_engine(engine)

    users_lifecycle = lifecycle.UserLifecycle(keys)
    auths.uuid = lifecycle.UuidWithUserIds()
    users_lifecycle.provision_on_insert(users.User)
    delete = users_lifecycle.wrap_delete_auth_by_id(auths.Auths.delete_auth_by_id)
    auths.Auths.delete_auth_by_id = delete
    auths.Auths.insert_new_auth = users_lifecycle.wrap_insert_new_auth(auths.Auths.insert_new_auth, delete)

    dependencies = 0
    for module, name in ((auth, "get_current_user"), (chats_router, "get_optional_verified_user")):
        original = getattr(module, name)
        found = binding.replace_dependency(app, original, binding.acting_dependency(adapter, original))
        if not found:
            raise ServeRefused(f"no route of Open WebUI depends on {module.__name__}.{name} any more: "
                               "this release is not supported (nothing was hooked)")
        dependencies += found
    sockets = binding.bind_socket_handlers(adapter, socket_main.sio.handlers["/"], socket_main.SESSION_POOL)

    async def automation_owner(app: Any, automation: Any) -> str | None:
        return automation.user_id

    async def timer_owner(app: Any, timer_id: str, claim_id: str | None = None) -> str | None:
        chat = await chats.Chats.get_chat_by_id(timer_id)  # nobody bound: metadata only
        return chat.user_id if chat else None

    run_automation = binding.acting_as_owner(adapter, automations.execute_automation, automation_owner)
    automations.execute_automation = run_automation
    automations_router.execute_automation = run_automation
    timers.execute_due_timer = binding.acting_as_owner(adapter, timers.execute_due_timer, timer_owner)
    realtime.get_verified_user_by_token = binding.binding_user_resolver(adapter, realtime.get_verified_user_by_token)

    responses.install_exception_handlers(app)
    app.state.owui_crypto = {"adapter": adapter, "lifecycle": users_lifecycle, "upsert": upsert, "search": search}
    say(f"hooked: engines 2, dependencies 2 (in {dependencies} places), socket.io handlers {len(sockets)}, "
        "user creation and deletion, automations, timers, realtime calls, chat_message upsert, chat search")
    return responses.RefusalResponses(app)
