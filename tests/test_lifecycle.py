"""Installing, refreshing, dumping, restoring and removing owui-crypto."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
from psycopg import sql

from app_adapter import migrate
from tests.conftest import load_owui_schema
from tests.owui import insert_chat, raw


def sealed_snapshot(conn) -> list[tuple]:
    return conn.execute("SELECT id, title, chat::text, summary FROM public.chat ORDER BY id").fetchall()


def test_rerunning_upgrade_and_refresh_changes_no_data(app, keyring, db_url):
    alice = keyring.user()
    keyring.activate(app, alice)
    insert_chat(app, alice, "stable", [("user", "x")])
    app.commit()
    before = sealed_snapshot(app)
    migrate.upgrade(db_url)
    app.execute("SELECT owui_crypto.refresh()")
    app.commit()
    with pytest.raises(psycopg.Error) as excinfo:  # dropping the wrapped DEKs would strand the data
        migrate.downgrade(db_url, "0004")
    assert excinfo.value.sqlstate == "OC006"
    migrate.upgrade(db_url)
    assert sealed_snapshot(app) == before


def test_refresh_picks_up_a_column_open_webui_added(app, keyring, db_url):
    app.execute("ALTER TABLE public.chat ADD COLUMN mood text DEFAULT 'calm'")
    app.commit()
    drift = app.execute("SELECT table_name, problem FROM owui_crypto.drift()").fetchall()
    assert [t for t, _ in drift] == ["chat"] and "differ from the base table" in drift[0][1]
    migrate.upgrade(db_url)  # re-running upgrade head refreshes
    assert app.execute("SELECT count(*) FROM owui_crypto.drift()").fetchone()[0] == 0
    alice = keyring.user()
    keyring.activate(app, alice)
    insert_chat(app, alice, "with mood", [("user", "x")], chat_id="m1")
    assert app.execute("SELECT mood, title FROM chat WHERE id = 'm1'").fetchone() == ("calm", "with mood")


def test_drift_reports_a_disabled_trigger(app):
    app.execute("ALTER TABLE public.chat DISABLE TRIGGER owui_crypto_seal_direct")
    problems = [p for _, p in app.execute("SELECT * FROM owui_crypto.drift()")]
    assert problems == ["seal trigger on the base table is missing or disabled"]


def test_downgrade_refuses_while_sealed_data_exists(app, keyring, db_url):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "keep me", [("user", "x")])
    app.commit()
    version = app.execute("SELECT version_num FROM owui_crypto_alembic_version").fetchone()
    with pytest.raises(psycopg.Error) as excinfo:
        migrate.downgrade(db_url, "base")
    assert excinfo.value.sqlstate == "OC006"
    assert "chat.title: 1" in str(excinfo.value)
    assert raw(app, "chat", "title", chat_id).startswith("oc1:")
    assert app.execute("SELECT version_num FROM owui_crypto_alembic_version").fetchone() == version


def test_downgrade_to_base_removes_everything_when_no_sealed_data(app, db_url):
    app.close()
    migrate.downgrade(db_url, "base")
    with psycopg.connect(db_url) as conn:
        leftovers = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'owui_crypto%'"
            " UNION ALL SELECT tgname FROM pg_trigger WHERE tgname LIKE 'owui_crypto%'"
            " UNION ALL SELECT attname FROM pg_attribute WHERE attrelid = 'public.user'::regclass"
            "   AND attname IN ('salt', 'user_encrypted_dek', 'user_key', 'kms_encrypted_dek') AND NOT attisdropped"
        ).fetchall()
        assert leftovers == []
    migrate.upgrade(db_url)  # and it installs again


def test_dump_and_restore_keeps_data_sealed_once(app, keyring, pg_server, db):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "survives restore", [("user", "restored message")])
    app.commit()
    before = sealed_snapshot(app)
    dump = subprocess.run(["pg_dump", "--no-owner", pg_server.url(db)], check=True, capture_output=True).stdout
    assert b"survives restore" not in dump and b"restored message" not in dump
    with pg_server.scratch_database("owui_crypto_t_restore") as restored:
        subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", pg_server.url(restored)], input=dump, check=True,
                       capture_output=True)
        url = pg_server.url(restored)
        with psycopg.connect(url, options="-c search_path=owui_crypto_view,public,pg_temp") as conn:
            assert sealed_snapshot(conn) == before
            keyring.activate(conn, alice)
            assert conn.execute("SELECT title FROM chat WHERE id = %s", (chat_id,)).fetchone()[0] == "survives restore"
            assert conn.execute("SELECT count(*) FROM owui_crypto.drift()").fetchone()[0] == 0


def test_migrates_as_a_database_owner_that_is_not_superuser(pg_server, run_id):
    role = f"owui_crypto_t_owner_{run_id}"
    app_role = f"owui_crypto_t_app_{run_id}"
    with pg_server.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(app_role)))
    name = pg_server.create_database("owui_crypto_t_owned", owner=role)
    try:
        url = pg_server.url(name).replace("://postgres@", f"://{role}@", 1)
        load_owui_schema(url)
        migrate.upgrade(url)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
            assert conn.execute("SELECT count(*) FROM owui_crypto.drift()").fetchone()[0] == 0
            conn.execute("INSERT INTO owui_crypto.grantee VALUES (%s)", (app_role,))
            conn.execute("SELECT owui_crypto.refresh()")
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(app_role)))
        app_url = pg_server.url(name).replace("://postgres@", f"://{app_role}@", 1)
        with psycopg.connect(app_url, options="-c search_path=owui_crypto_view,public,pg_temp") as conn:
            # The application role reads and writes through the views only...
            assert conn.execute("SELECT count(*) FROM chat").fetchone() == (0,)
            # ...and cannot read the key ring or the base tables.
            for table in ("owui_crypto.user_key", "owui_crypto.deployment_key", "public.chat"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"SELECT * FROM {table}")
                conn.rollback()
    finally:
        pg_server.drop_database(name)
        with pg_server.connect() as admin:
            admin.execute(sql.SQL("DROP ROLE {}, {}").format(sql.Identifier(role), sql.Identifier(app_role)))


def test_nothing_is_granted_to_public_and_definers_pin_search_path(app):
    public_grants = app.execute("""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
               aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
         WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view') AND a.grantee = 0
        UNION ALL
        SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace,
               aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
         WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view') AND a.grantee = 0
        UNION ALL
        SELECT t.oid::regtype::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace,
               aclexplode(coalesce(t.typacl, acldefault('T', t.typowner))) a
         WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view') AND a.grantee = 0
           AND t.typcategory <> 'A'  -- array types carry no privileges of their own
        UNION ALL
        SELECT n.nspname FROM pg_namespace n, aclexplode(n.nspacl) a
         WHERE n.nspname IN ('owui_crypto', 'owui_crypto_view') AND a.grantee = 0""").fetchall()
    assert public_grants == []
    unpinned = app.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname LIKE 'owui_crypto%' AND p.prosecdef
           AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY(p.proconfig), false)""").fetchall()
    assert unpinned == []
    definers = app.execute("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                           " WHERE n.nspname = 'owui_crypto' AND p.prosecdef").fetchone()[0]
    assert definers >= 8


def test_detach_lets_open_webui_drop_and_retype_columns(app, db_url):
    """Open WebUI's own migrations may drop or retype columns the views (or triggers) would pin."""
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):
        app.execute("ALTER TABLE public.chat DROP COLUMN last_read_at")
    app.rollback()
    app.execute("SELECT owui_crypto.detach()")
    app.execute("ALTER TABLE public.chat DROP COLUMN last_read_at")
    app.execute("ALTER TABLE public.chat ALTER COLUMN summary TYPE varchar")
    app.commit()
    drifted = {t for t, _ in app.execute("SELECT * FROM owui_crypto.drift()")}
    assert drifted == {t for (t,) in app.execute("SELECT table_name FROM owui_crypto.protected_table")}
    app.execute("SELECT owui_crypto.refresh()")
    app.commit()
    assert app.execute("SELECT count(*) FROM owui_crypto.drift()").fetchone() == (0,)
    assert "last_read_at" not in [r[0] for r in app.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'owui_crypto_view.chat'::regclass")]
