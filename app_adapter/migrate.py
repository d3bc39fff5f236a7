"""Installing and removing owui-crypto's SQL with Alembic.

The SQL lives in ``sql/`` (the source of truth); each migration in
``alembic/versions`` applies some of those files. This module is what the
migrations, ``alembic/env.py`` and the ``owui-crypto upgrade`` command share.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alembic.config import Config
from sqlalchemy.engine import Connection

from alembic import command, op

VERSION_TABLE = "owui_crypto_alembic_version"


def _roots() -> list[Path]:
    """Where shipped files live: the source tree (a checkout or an editable install),
    then ``<prefix>/share/owui-crypto`` (a wheel). In a wheel install the package's
    parent is ``site-packages``, whose ``alembic`` is the Alembic library: it counts
    as the source tree only if it holds owui-crypto's own ``alembic.ini`` and SQL."""
    source = Path(__file__).resolve().parent.parent
    shipped = Path(sys.prefix) / "share" / "owui-crypto"
    is_tree = (source / "alembic.ini").is_file() and (source / "sql" / "00_foundation.sql").is_file()
    return [source, shipped] if is_tree else [shipped]


def project_file(*parts: str) -> Path:
    """A file shipped with owui-crypto: from the source tree, or installed under
    ``<prefix>/share/owui-crypto`` by a wheel."""
    for root in _roots():
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"owui-crypto file {'/'.join(parts)} is missing from this installation")


def database_url(url: str | None = None) -> str:
    """The SQLAlchemy URL to migrate: ``url``, else ``DATABASE_URL``, always with psycopg 3.

    With the database settings of :mod:`app_adapter.aurora` (a secret, IAM tokens, a CA bundle), the URL is
    completed from them and the connect hooks are installed: every CLI command goes through here."""
    from app_adapter import aurora

    url = aurora.resolve(url or os.environ.get("DATABASE_URL"))
    if not url:
        raise SystemExit("DATABASE_URL is not set: point it at Open WebUI's PostgreSQL database, "
                         "e.g. postgresql+psycopg://user@host:5432/openwebui")
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise SystemExit(f"DATABASE_URL must be a PostgreSQL URL (postgresql://...), not {url.split(':', 1)[0]}:...")


def run_sql_file(connection: Connection, name: str) -> None:
    """Run one file of ``sql/`` on ``connection``, inside its transaction."""
    text = project_file("sql", name).read_text(encoding="utf-8")
    # The raw DB-API cursor without parameters: psycopg then sends the file as
    # one simple-protocol query, so multi-statement files and '%' just work.
    raw = connection.connection.dbapi_connection
    assert raw is not None, "a connection checked out of the pool has its DB-API connection"
    cursor = raw.cursor()
    try:
        cursor.execute(text)
    finally:
        cursor.close()


def apply_sql(*names: str) -> None:
    """Run files of ``sql/`` in order, from inside a migration."""
    for name in names:
        run_sql_file(op.get_bind(), name)


def refresh(connection: Connection) -> None:
    """Rebuild the views and triggers from the policy and the live tables."""
    installed = connection.exec_driver_sql("SELECT to_regprocedure('owui_crypto.refresh()') IS NOT NULL").scalar()
    if installed:
        connection.exec_driver_sql("SELECT owui_crypto.refresh()")


def alembic_config(url: str | None = None) -> Config:
    config = Config(str(project_file("alembic.ini")))
    config.set_main_option("script_location", str(project_file("alembic")))
    config.attributes["database_url"] = database_url(url)
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
