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
4. import Open WebUI -- with ``ENABLE_DB_MIGRATIONS=false``, its migrations
   are done -- check the shape of everything about to be wrapped, then
   install every hook (nothing is installed if a check fails);
5. serve ``open_webui.main:app`` with uvicorn.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import psycopg

from app_adapter import aurora, migrate
from app_adapter.errors import ConfigError
from app_adapter.owui import compat, migrating

#: Variables from which Open WebUI builds a database URL that overrides DATABASE_URL (env.py:273-294).
_URL_PARTS = ("DATABASE_TYPE", "DATABASE_USER", "DATABASE_HOST", "DATABASE_PORT", "DATABASE_NAME")


class ServeRefused(ConfigError):
    """A setting owui-crypto cannot protect; the message says what to change."""


def say(message: str) -> None:
    print(f"owui-crypto: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    database_url: str  # postgresql+psycopg://
    owui_version: str
    run_owui_migrations: bool


def normalise_database_url(url: str | None) -> str:
    """The SQLAlchemy URL Open WebUI must use, or :class:`ServeRefused` saying what to change."""
    if not url:
        raise ServeRefused("DATABASE_URL is not set, so Open WebUI would use SQLite. Set DATABASE_URL="
                           "postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME")
    scheme = url.split(":", 1)[0].lower()
    if scheme.startswith("sqlite"):
        raise ServeRefused(f"DATABASE_URL is {scheme}:...: owui-crypto encrypts inside PostgreSQL and cannot protect "
                           "SQLite. Move Open WebUI to PostgreSQL and set DATABASE_URL=postgresql+psycopg://...")
    if "psycopg2" in scheme or scheme in ("postgresql+pg8000", "postgresql+asyncpg"):
        raise ServeRefused(f"DATABASE_URL uses {scheme}: that driver inlines parameters into SQL text, where keys and "
                           "chat text reach the server's logs. Use postgresql+psycopg:// (psycopg 3)")
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ServeRefused(f"DATABASE_URL is {scheme}:...: owui-crypto needs PostgreSQL (postgresql+psycopg://...)")


def plan(environ: MutableMapping[str, str]) -> Plan:
    """Check the environment and prepare it for Open WebUI; nothing is imported or connected yet."""
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
    return Plan(url, version, run_owui)


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


def serve(host: str, port: int) -> int:
    started = time.monotonic()
    steps = plan(os.environ)
    say(f"open-webui {steps.owui_version} (supported: {compat.SUPPORTED})")
    if (database := aurora.describe()) is not None:
        say(database)

    from app_adapter.config import Settings
    from app_adapter.keys import KeyService

    settings = Settings.from_env()
    keys = KeyService(settings, steps.database_url)
    from app_adapter import metrics

    exporter = metrics.start(settings, keys)  # first: a port in use stops the start now, not after a minute
    if exporter is not None:
        say(f"Prometheus metrics on {exporter.url}")
    say(f"KMS keys: {keys.kms.check_keys()}")

    if steps.run_owui_migrations:
        say("running Open WebUI's migrations")
        step = time.monotonic()
        # Other instances keep serving meanwhile: each view Open WebUI's DDL touches is rebuilt inside its
        # transaction, never dropped where they could see it (app_adapter/owui/migrating.py).
        with migrating.views_kept(steps.database_url) as kept:
            run_owui_migrations()
        rebuilt = sorted(kept.rebuilt) if kept is not None else []
        say(f"Open WebUI's migrations done in {time.monotonic() - step:.1f} s"
            + (f"; rebuilt the decrypting views of {', '.join(rebuilt)} in their transaction" if rebuilt else ""))
    else:
        say("ENABLE_DB_MIGRATIONS=false: not running Open WebUI's migrations")
    say("running owui-crypto's migrations")
    step = time.monotonic()
    migrate.upgrade(steps.database_url)
    check_drift(steps.database_url)
    say(f"owui-crypto's migrations done in {time.monotonic() - step:.1f} s")
    keys.share_key()

    from app_adapter.owui.lifecycle import reconcile

    done = reconcile(keys)
    if done.provisioned or done.forgotten:
        say(f"gave keys to {len(done.provisioned)} user(s) without one; forgot keys of {len(done.forgotten)} "
            "deleted user(s)")
    if done.weak_copies_removed:
        say(f"removed key copies the database could open (wrapped under the user id by earlier releases) of "
            f"{len(done.weak_copies_removed)} user(s); their KMS copies hold the same keys")

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
