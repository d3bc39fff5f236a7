"""Open WebUI's migrations with the decrypting views kept in place (app_adapter/owui/migrating.py).

A migration runs as Open WebUI's env.py runs it: one SQLAlchemy connection, one transaction for everything. Other
connections stand for the instances still serving: they must never find a protected table's name resolving to the
base table (ciphertext) nor fail, only wait.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, event, pool
from sqlalchemy.engine import Engine

from app_adapter.owui import migrating
from tests.conftest import APP_SEARCH_PATH, load_owui_schema
from tests.keyring import Keyring
from tests.owui import insert_chat


def engine_for(db_url: str, **kw: Any) -> Engine:
    """As Open WebUI's env.py makes it: its own NullPool engine, psycopg 3."""
    return create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=pool.NullPool, **kw)


def view_columns(conn: psycopg.Connection, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum", (f"owui_crypto_view.{table}",))]


def drift(db_url: str) -> list[tuple]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT * FROM owui_crypto.drift()").fetchall()


class Reader(threading.Thread):
    """Another instance: the owner's key active, ``chat`` read by its plain name as Open WebUI reads it."""

    def __init__(self, db_url: str, keyring: Keyring, user: str, chat_id: str) -> None:
        super().__init__(daemon=True)
        self.db_url, self.keyring, self.user, self.chat_id = db_url, keyring, user, chat_id
        self.ready = threading.Event()
        self.pid = 0
        self.row: tuple | None = None
        self.columns: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.db_url, options=f"-c search_path={APP_SEARCH_PATH}") as conn:
                self.pid = conn.info.backend_pid
                self.keyring.activate(conn, self.user)
                self.ready.set()
                cur = conn.execute("SELECT * FROM chat WHERE id = %s", (self.chat_id,))
                self.columns = [d.name for d in cur.description or []]
                row = cur.fetchone()
                where = cur.execute("SELECT relnamespace::regnamespace::text FROM pg_class"
                                    " WHERE oid = 'chat'::regclass")
                self.row = (row[self.columns.index("title")] if row else None, where.fetchone())
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()


def wait_until_waiting_on_a_lock(db_url: str, pid: int) -> None:
    deadline = time.monotonic() + 10
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == \
                    ("Lock",):
                return
            time.sleep(0.05)
    raise AssertionError(f"the reader (pid {pid}) never waited on the migration's lock")


def test_statements_name_the_tables_they_change():
    assert migrating.tables_in("ALTER TABLE chat ADD COLUMN timer_at BIGINT") == {"chat"}
    assert migrating.tables_in('ALTER TABLE "user" ADD COLUMN x TEXT') == {"user"}
    assert migrating.tables_in('ALTER TABLE IF EXISTS ONLY public."Note" DROP COLUMN x') == {"Note"}
    assert migrating.tables_in("alter table Public.CHAT alter column summary type varchar") == {"chat"}
    assert migrating.tables_in("ALTER TABLE chat_new RENAME TO chat") == {"chat_new", "chat"}
    assert migrating.tables_in("DROP TABLE IF EXISTS note, public.memory CASCADE") == {"note", "memory"}
    assert migrating.tables_in("CREATE TABLE IF NOT EXISTS file (id text)") == {"file"}
    assert migrating.tables_in("DO $$ BEGIN EXECUTE 'ALTER TABLE folder ADD COLUMN y text'; END $$") == {"folder"}
    # what cannot conflict with a view, or is not Open WebUI's table
    assert migrating.tables_in("CREATE INDEX timer_at_idx ON chat (timer_at)") == set()
    assert migrating.tables_in("ALTER TABLE chat RENAME COLUMN a TO b") == {"chat"}
    assert migrating.tables_in("ALTER TABLE owui_crypto.grantee ADD COLUMN z text") == set()
    assert migrating.tables_in("UPDATE chat SET title = 'ALTER TABLE note'") == {"note"}  # harmless: one more swap
    assert migrating.tables_in("SELECT * FROM chat") == set()


def test_add_drop_and_retype_keep_the_view_for_a_concurrent_reader(db_url, keyring, app):
    alice = keyring.user()
    keyring.activate(app, alice)
    chat_id = insert_chat(app, alice, "rolling title", [("user", "hello")])
    app.commit()
    reader = Reader(db_url, keyring, alice, chat_id)

    with migrating.views_kept(db_url) as keeper, engine_for(db_url).connect() as conn:
        assert keeper is not None and {"chat", "chat_message", "note"} <= keeper.tables
        with conn.begin():
            conn.exec_driver_sql("ALTER TABLE chat ADD COLUMN mood text DEFAULT 'calm'")
            conn.exec_driver_sql("ALTER TABLE chat DROP COLUMN last_read_at")  # the view reads it: fails without
            conn.exec_driver_sql("ALTER TABLE chat ALTER COLUMN summary TYPE varchar")  # a protected column
            with psycopg.connect(db_url, autocommit=True) as other:  # the view, as every other session sees it
                assert "last_read_at" in view_columns(other, "chat") and "mood" not in view_columns(other, "chat")
            reader.start()
            assert reader.ready.wait(10) and reader.error is None
            wait_until_waiting_on_a_lock(db_url, reader.pid)
        assert keeper.rebuilt == {"chat"}
    reader.join(10)

    assert reader.error is None, reader.error
    assert reader.row == ("rolling title", ("owui_crypto_view",))  # plaintext, from the new view
    assert "mood" in reader.columns and "last_read_at" not in reader.columns
    assert drift(db_url) == []
    assert not event.contains(Engine, "before_cursor_execute", keeper._before)  # only while migrating


def test_a_migration_that_removes_a_protected_column_or_table_is_rolled_back(db_url, app):
    for statement, named in (("ALTER TABLE chat DROP COLUMN summary", "public.chat.summary"),
                             ("DROP TABLE prompt_history", "public.prompt_history")):
        with migrating.views_kept(db_url) as keeper, engine_for(db_url).connect() as conn:
            assert keeper is not None
            with pytest.raises(migrating.RollingUpgradeRefused) as refused, conn.begin():
                conn.exec_driver_sql("ALTER TABLE chat ADD COLUMN mood text")
                conn.exec_driver_sql(statement)
            assert keeper.rebuilt == set()
        message = str(refused.value)
        assert named in message and "protected_column" in message and "rolled back" in message
        # nothing committed: the column, the table and every view are as they were
        assert app.execute("SELECT to_regclass('public.prompt_history') IS NOT NULL").fetchone() == (True,)
        assert "summary" in view_columns(app, "chat") and "mood" not in view_columns(app, "chat")
        assert drift(db_url) == []


def test_a_table_renamed_away_and_recreated_gets_its_view_back(db_url, app):
    with migrating.views_kept(db_url) as keeper, engine_for(db_url).connect() as conn:
        assert keeper is not None
        with conn.begin():
            conn.exec_driver_sql("ALTER TABLE memory RENAME TO memory_old")  # no public.memory: the view waits
            conn.exec_driver_sql("CREATE TABLE memory (LIKE memory_old INCLUDING ALL)")
            conn.exec_driver_sql("INSERT INTO memory SELECT * FROM memory_old")
            conn.exec_driver_sql("DROP TABLE memory_old")
            with conn.begin_nested() as savepoint:  # a savepoint the migration gives up: its swap goes with it
                conn.exec_driver_sql("ALTER TABLE note ADD COLUMN abandoned text")
                savepoint.rollback()
        assert keeper.rebuilt == {"memory", "note"}
    assert drift(db_url) == []
    assert app.execute("SELECT DISTINCT d.refobjid::regclass::text FROM pg_rewrite r"
                       " JOIN pg_depend d ON d.objid = r.oid"
                       " WHERE r.ev_class = 'owui_crypto_view.memory'::regclass AND d.refobjid <> r.ev_class"
                       " AND d.refclassid = 'pg_class'::regclass").fetchall() == [("public.memory",)]  # the new table
    assert app.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.memory'::regclass "
                       "AND tgname = 'owui_crypto_seal_direct'").fetchone() == ("owui_crypto_seal_direct",)
    assert "abandoned" not in view_columns(app, "note")


def test_ddl_outside_a_transaction_is_refused_before_it_runs_unless_the_views_were_detached(db_url, app):
    def base_columns() -> list[str]:
        return [r[0] for r in app.execute("SELECT column_name FROM information_schema.columns"
                                          " WHERE table_schema = 'public' AND table_name = 'chat'")]

    with migrating.views_kept(db_url), engine_for(db_url, isolation_level="AUTOCOMMIT").connect() as conn:
        with pytest.raises(migrating.RollingUpgradeRefused, match="outside a transaction") as refused:
            conn.exec_driver_sql("ALTER TABLE chat ADD COLUMN mood text")
        assert "owui_crypto.detach()" in str(refused.value)
        assert "mood" not in base_columns() and drift(db_url) == []
        # the way out the message names: every view detached by hand, then nothing is left to keep
        conn.exec_driver_sql("SELECT owui_crypto.detach()")
        conn.exec_driver_sql("ALTER TABLE chat ADD COLUMN mood text")
    assert "mood" in base_columns()
    app.rollback()
    app.execute("SELECT owui_crypto.refresh()")
    app.commit()
    assert drift(db_url) == []


def test_nothing_to_keep_before_owui_crypto_is_installed(pg_server):
    with pg_server.scratch_database("owui_crypto_t_rolling") as name:
        load_owui_schema(pg_server.url(name))
        with migrating.views_kept(pg_server.url(name)) as keeper:
            assert keeper is None


ENV_PY = '''
from alembic import context
from sqlalchemy import create_engine, pool

engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
with engine.connect() as connection:
    # as Open WebUI's migrations/env.py: no transaction_per_migration, so one transaction for every migration
    context.configure(connection=connection, target_metadata=None, version_table="rolling_test_version")
    with context.begin_transaction():
        context.run_migrations()
'''

REVISION = '''
import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {down!r}


def upgrade():
    {body}
'''


def test_through_alembic_as_open_webui_runs_it(db_url, app, tmp_path):
    from alembic.config import Config

    from alembic import command

    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(ENV_PY)
    (tmp_path / "script.py.mako").write_text("")
    for revision, down, body in (
            ("r1", None, "op.add_column('chat', sa.Column('mood', sa.Text()))\n    op.alter_column("
                         "'chat', 'last_read_at', type_=sa.Text(), postgresql_using='last_read_at::text')"),
            ("r2", "r1", "op.drop_column('chat', 'summary')")):
        (tmp_path / "versions" / f"{revision}.py").write_text(REVISION.format(revision=revision, down=down, body=body))
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    config.set_main_option("sqlalchemy.url", db_url.replace("postgresql://", "postgresql+psycopg://", 1))

    def state() -> tuple:
        app.rollback()
        version = app.execute("SELECT to_regclass('public.rolling_test_version') IS NOT NULL AND "
                              "EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'chat'"
                              " AND column_name = 'mood')").fetchone()
        return version, view_columns(app, "chat")

    with migrating.views_kept(db_url) as keeper:
        with pytest.raises(migrating.RollingUpgradeRefused, match="chat.summary"):
            command.upgrade(config, "head")  # r1 and r2 in one transaction: r2 takes it all back
        assert state()[0] == (False,) and "mood" not in state()[1] and drift(db_url) == []
        command.upgrade(config, "r1")
        assert keeper is not None and keeper.rebuilt == {"chat"}
    assert state()[0] == (True,) and "mood" in state()[1] and drift(db_url) == []
    assert app.execute("SELECT data_type FROM information_schema.columns WHERE table_schema = 'owui_crypto_view'"
                       " AND table_name = 'chat' AND column_name = 'last_read_at'").fetchone() == ("text",)
