"""``owui-crypto serve`` with two roles: the owner's URL (``OWUI_CRYPTO_OWNER_DATABASE_URL``) read and kept out of
the environment, and the application role (``DATABASE_URL``'s user) refused when it could act as the owner, granted
exactly what Open WebUI needs otherwise. Real PostgreSQL, roles that are not superusers; e2e/test_two_roles.py runs
the real Open WebUI that way."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from app_adapter import aurora, devdb, migrate
from app_adapter.errors import ConfigError
from app_adapter.owui import compat, launcher
from tests.roles import Roles, as_role

OWNER_ENV = launcher.OWNER_URL_ENV
GOOD = {"DATABASE_URL": "postgresql://owui_app:app-pw@db:5432/owui", "WEBUI_SECRET_KEY": "s" * 32}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (aurora.DB_SECRET_ENV, aurora.IAM_AUTH_ENV, aurora.CA_BUNDLE_ENV, aurora.OWUI_IAM_AUTH_ENV,
                 "PGPASSWORD", OWNER_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(compat, "installed_version", lambda: "0.12.4")
    monkeypatch.setattr(compat, "installed_from_wheel", lambda: True)
    aurora.reset()
    yield
    aurora.reset()


# -- the setting -------------------------------------------------------------------------------------------


def test_one_role_is_as_before() -> None:
    environ = dict(GOOD)
    plan = launcher.plan(environ)
    assert plan.owner_url is None and plan.migrating_url == plan.database_url == environ["DATABASE_URL"]
    assert "OWUI_CRYPTO_OWNER_DATABASE_URL is not set" in launcher.ONE_ROLE_WARNING


def test_the_owners_url_leaves_the_environment_and_shows_nowhere() -> None:
    environ = {**GOOD, OWNER_ENV: "postgres://owui_owner:owner-secret-pw@db:5432/owui"}
    plan = launcher.plan(environ)
    assert OWNER_ENV not in environ and not [v for v in environ.values() if "owner-secret-pw" in v]
    assert plan.owner_url == plan.migrating_url == "postgresql+psycopg://owui_owner:owner-secret-pw@db:5432/owui?" \
                                                   "sslmode=require"  # a password to a remote host goes over TLS
    assert plan.database_url == environ["DATABASE_URL"] == "postgresql+psycopg://owui_app:app-pw@db:5432/owui"
    assert "owner-secret-pw" not in repr(plan)


def test_on_this_machine_the_owners_url_keeps_libpqs_tls_default() -> None:
    plan = launcher.plan({**GOOD, OWNER_ENV: "postgresql://owner:pw@127.0.0.1:5432/owui"})
    assert plan.owner_url == "postgresql+psycopg://owner:pw@127.0.0.1:5432/owui"


@pytest.mark.parametrize(("owner", "extra", "says"), [
    ("sqlite:///webui.db", {}, f"{OWNER_ENV} is sqlite"),
    ("postgresql+psycopg2://o@db/owui", {}, f"{OWNER_ENV} uses postgresql\\+psycopg2"),
    ("mysql://o@db/owui", {}, "needs PostgreSQL"),
    ("postgresql://o:pw@db/owui?sslmode=disable", {}, f"{OWNER_ENV} says sslmode=disable"),
    ("postgresql://o@db/owui", {"PGPASSWORD": "pw"}, "PGPASSWORD is set beside"),
])
def test_a_bad_owner_url_is_refused_and_taken_out_of_the_environment(owner: str, extra: dict[str, str],
                                                                     says: str) -> None:
    environ = {**GOOD, OWNER_ENV: owner, **extra}
    with pytest.raises(ConfigError, match=says):  # ServeRefused is one
        launcher.plan(environ)
    assert OWNER_ENV not in environ


def test_the_ca_bundle_applies_to_the_owner_too(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    plan = launcher.plan({**GOOD, aurora.CA_BUNDLE_ENV: str(bundle),
                          OWNER_ENV: "postgresql://owner:pw@db.example:5432/owui?sslmode=require"})
    assert plan.owner_url is not None and "sslmode=verify-full" in plan.owner_url
    assert f"sslrootcert={bundle.resolve()}" in plan.owner_url


def test_with_iam_tokens_for_the_application_role_the_owner_keeps_its_own_credentials(kms_server: Any) -> None:
    """DATABASE_URL's user gets a fresh token per connection; the owner's URL, handed back unchanged by every later
    resolve (owui-crypto's migrations resolve the URL they are given), never gets one."""
    environ = {**GOOD, "DATABASE_URL": "postgresql://owui_app@db.example:5432/owui", aurora.IAM_AUTH_ENV: "true",
               "AWS_REGION": "us-east-1", OWNER_ENV: "postgresql://owui_owner:pw@db.example:5432/owui"}
    plan = launcher.plan(environ)
    assert plan.owner_url is not None
    assert aurora.resolve(plan.owner_url, environ) == plan.owner_url
    assert migrate.database_url(plan.owner_url) == plan.owner_url
    owner_params = {"host": "db.example", "port": "5432", "user": "owui_owner"}
    assert aurora._password_for(owner_params) is None
    assert aurora._password_for({**owner_params, "user": "owui_app"}) is not None
    assert aurora.describe() == ("database owui_app@db.example:5432: a fresh RDS IAM token per connection "
                                 "(region us-east-1); sslmode=require")


# -- the application role, in PostgreSQL --------------------------------------------------------------------


@pytest.fixture
def database(pg_server: devdb.Server, roles: Roles, owned_template: str) -> Iterator[str]:
    """Open WebUI's schema and owui-crypto, installed by the owner (not a superuser), which owns the database."""
    name = pg_server.create_database("owui_crypto_t_roles", template=owned_template, owner=roles.owner)
    try:
        yield name
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def extra_role(pg_server: devdb.Server) -> Iterator[str]:
    """A plain login role of this test's own (the refusals give it what a role must not have)."""
    name = f"owui_crypto_t_extra_{secrets.token_hex(4)}"
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_server.connect() as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def urls(pg_server: devdb.Server, database: str, app: str, owner: str) -> tuple[str, str]:
    return as_role(pg_server.url(database), app), as_role(pg_server.url(database), owner)


def test_a_plain_login_role_is_accepted(pg_server: devdb.Server, roles: Roles, database: str) -> None:
    assert launcher.checked_application_role(*urls(pg_server, database, roles.app, roles.owner)) == roles.app


def superuser(admin: psycopg.Connection, role: str, database: str) -> None:
    admin.execute(sql.SQL("ALTER ROLE {} SUPERUSER").format(sql.Identifier(role)))


def member_of_owner(admin: psycopg.Connection, role: str, database: str, owner: str) -> None:
    admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(owner), sql.Identifier(role)))


def owns_database(admin: psycopg.Connection, role: str, database: str) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), sql.Identifier(role)))


def in_database(statement: str) -> Any:
    def change(admin: psycopg.Connection, role: str, database: str, server: devdb.Server) -> None:
        with server.connect(database) as conn:
            conn.execute(sql.SQL(statement).format(role=sql.Identifier(role)))
    return change


@pytest.mark.parametrize(("change", "says"), [
    ("superuser", "is a superuser"),
    ("member", "is a member of the owner's role"),
    ("database", "owns the database"),
    ("ALTER SCHEMA public OWNER TO {role}", "owns the schema public"),
    ("ALTER SCHEMA owui_crypto OWNER TO {role}", "owns owui_crypto"),
    ("ALTER FUNCTION owui_crypto.active_user() OWNER TO {role}", "owns functions in owui_crypto"),
    ('ALTER TABLE public."user" OWNER TO {role}', 'owns tables such as "user"'),
])
def test_a_role_that_could_act_as_the_owner_is_refused(pg_server: devdb.Server, roles: Roles, database: str,
                                                       extra_role: str, change: str, says: str) -> None:
    with pg_server.connect() as admin:
        if change == "superuser":
            superuser(admin, extra_role, database)
        elif change == "member":
            member_of_owner(admin, extra_role, database, roles.owner)
        elif change == "database":
            owns_database(admin, extra_role, database)
        else:
            in_database(change)(admin, extra_role, database, pg_server)
    try:
        with pytest.raises(launcher.ServeRefused, match=says) as refused:
            launcher.checked_application_role(*urls(pg_server, database, extra_role, roles.owner))
        assert "Give Open WebUI a login role of its own" in str(refused.value)
    finally:
        with pg_server.connect(database) as admin:  # the role is dropped after the test: give back what it owns
            admin.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(sql.Identifier(extra_role),
                                                                     sql.Identifier(roles.owner)))
            admin.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(extra_role)))
            admin.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(roles.owner),
                                                              sql.Identifier(extra_role)))


def test_the_same_role_twice_or_another_database_is_refused(pg_server: devdb.Server, roles: Roles,
                                                            database: str) -> None:
    app_url, owner_url = urls(pg_server, database, roles.app, roles.owner)
    with pytest.raises(launcher.ServeRefused, match="both connect as"):
        launcher.checked_application_role(owner_url, owner_url)
    with pg_server.scratch_database("owui_crypto_t_other", owner=roles.owner) as other:
        with pytest.raises(launcher.ServeRefused, match="name different databases"):
            launcher.checked_application_role(app_url, as_role(pg_server.url(other), roles.owner))


def attempt(conn: psycopg.Connection, query: str) -> str:
    try:
        conn.execute(query.encode())
    except psycopg.Error as exc:
        conn.rollback()
        return exc.sqlstate or "?"
    conn.rollback()
    return "worked"


def test_the_grant_is_owui_crypto_grant_plus_open_webuis_other_tables(pg_server: devdb.Server, roles: Roles,
                                                                      database: str) -> None:
    app_url, owner_url = urls(pg_server, database, roles.app, roles.owner)
    with pg_server.connect(database) as admin:  # left from an earlier, broader grant: made exact again
        admin.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(roles.app)))
    tables = launcher.grant_application_role(owner_url, roles.app)
    with psycopg.connect(owner_url, autocommit=True) as owner:
        assert owner.execute("SELECT role_name::text FROM owui_crypto.grantee").fetchall() == [(roles.app,)]
        public_tables = owner.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        protected = owner.execute("SELECT count(*) FROM owui_crypto.protected_table").fetchone()[0]
    assert tables == public_tables - protected - 2  # less the two version tables
    with psycopg.connect(app_url) as app:
        outcomes = {query: attempt(app, query) for query in (
            "SELECT count(*) FROM public.config", "UPDATE public.config SET updated_at = updated_at",
            "SELECT count(*) FROM owui_crypto_view.chat", "SELECT id FROM public.chat_message",
            "SELECT content FROM public.chat_message", "DELETE FROM public.chat_message", "SELECT * FROM public.chat",
            "UPDATE public.chat SET archived = archived", "DELETE FROM alembic_version",
            "DELETE FROM owui_crypto_alembic_version", "SELECT * FROM owui_crypto.user_key",
            "CREATE TEMP TABLE t (x int)", "CREATE TABLE public.t (x int)")}
    assert outcomes == {
        "SELECT count(*) FROM public.config": "worked", "UPDATE public.config SET updated_at = updated_at": "worked",
        "SELECT count(*) FROM owui_crypto_view.chat": "worked", "SELECT id FROM public.chat_message": "worked",
        "SELECT content FROM public.chat_message": "42501", "DELETE FROM public.chat_message": "42501",
        "SELECT * FROM public.chat": "42501", "UPDATE public.chat SET archived = archived": "42501",
        "DELETE FROM alembic_version": "42501", "DELETE FROM owui_crypto_alembic_version": "42501",
        "SELECT * FROM owui_crypto.user_key": "42501",
        "CREATE TEMP TABLE t (x int)": "42501", "CREATE TABLE public.t (x int)": "42501"}
    assert launcher.checked_application_role(app_url, owner_url) == roles.app  # still none of the refusals


# -- doctor and check say which way serve would run --------------------------------------------------------


def test_doctor_says_one_role_or_two() -> None:
    from app_adapter.doctor import Status, serve_roles

    one = serve_roles("owui_admin", True, {})
    assert one.status == Status.WARN and "one role" in one.message and OWNER_ENV in one.action
    two = serve_roles("owui_app", False, {OWNER_ENV: "postgresql://owner@db/owui"})
    assert two.status == Status.PASS and "serves Open WebUI as owui_app" in two.message


def test_check_warns_of_one_role_without_failing(pg_server: devdb.Server, roles: Roles, database: str,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from app_adapter import cli

    app_url, owner_url = urls(pg_server, database, roles.app, roles.owner)
    cli.main(["check", "--database-url", owner_url])
    assert f"warning: {OWNER_ENV} is not set" in capsys.readouterr().out
    monkeypatch.setenv(OWNER_ENV, owner_url)
    cli.main(["check", "--database-url", owner_url])
    assert "warning" not in capsys.readouterr().out
