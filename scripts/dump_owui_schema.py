#!/usr/bin/env python3
"""Dump the PostgreSQL schema that Open WebUI's own migrations create.

Creates a throw-away database with a random name, lets the installed
open-webui package run its own Alembic migrations against it (importing
``open_webui.config`` does that when DATABASE_URL is ``postgresql+psycopg://``),
then writes ``pg_dump --schema-only`` plus the data of ``alembic_version`` to
the output file, so that an Open WebUI started on a database loaded from the
fixture sees itself as fully migrated.  The throw-away database is dropped at
the end, also on failure.

Run it with the interpreter of the venv made by ``scripts/owui_env.sh``:

    .venv-owui/bin/python scripts/dump_owui_schema.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --out tests/fixtures/owui_0_12_4_schema.sql

The output loads with ``psql -v ON_ERROR_STOP=1`` into an empty database owned
by a non-superuser role (no ownership, privileges or comments are dumped).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from urllib.parse import urlsplit, urlunsplit

# Environment for the subprocess that imports open_webui.config.  Everything
# that could reach the network or load models is switched off.
OWUI_ENV = {
    "OFFLINE_MODE": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "ENABLE_OLLAMA_API": "false",
    "ENABLE_OPENAI_API": "false",
    "RAG_EMBEDDING_ENGINE": "openai",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
    "ENABLE_VERSION_UPDATE_CHECK": "false",
    "ENABLE_DB_MIGRATIONS": "true",
    "FROM_INIT_PY": "true",
    "SCARF_NO_ANALYTICS": "true",
    "DO_NOT_TRACK": "true",
    "ANONYMIZED_TELEMETRY": "false",
}

# Environment variables of the caller that would steer Open WebUI elsewhere.
SCRUB_PREFIXES = ("DATABASE_", "REDIS_", "WEBUI_", "OPENAI_", "OLLAMA_", "ENABLE_")

MIGRATE_CODE = """
import open_webui.config  # runs open_webui's alembic 'upgrade head' on import
"""


def log(msg: str) -> None:
    print(f"dump_owui_schema: {msg}", file=sys.stderr, flush=True)


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def libpq_url(url: str) -> str:
    """A URL that psycopg / pg_dump accept (no SQLAlchemy driver suffix)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SystemExit(f"not a URL: {url!r}")
    if scheme.startswith("postgresql+") or scheme.startswith("postgres+") or scheme == "postgres":
        scheme = "postgresql"
    if scheme != "postgresql":
        raise SystemExit(f"need a postgresql:// URL, got scheme {scheme!r}")
    return f"{scheme}://{rest}"


def sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg://" + url.partition("://")[2]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def run_owui_migrations(db_url: str, workdir: str, verbose: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB_PREFIXES)}
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir)
    env.update(OWUI_ENV)
    env.update(
        {
            "DATABASE_URL": sqlalchemy_url(db_url),
            "WEBUI_SECRET_KEY": secrets.token_hex(32),
            "DATA_DIR": data_dir,
            "HOME": workdir,
        }
    )
    proc = subprocess.run(  # noqa: PLW1510 - the return code is examined below
        [sys.executable, "-c", MIGRATE_CODE],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if verbose or proc.returncode != 0:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"open_webui migrations failed (exit {proc.returncode})")


def pg_dump(db_url: str, *args: str) -> str:
    return run(["pg_dump", "--dbname", db_url, *args], stdout=subprocess.PIPE, text=True).stdout


def clean_dump(text: str) -> str:
    """Drop lines that a later load does not need or that tie it to this server."""
    out = []
    for line in text.splitlines():
        # pg_dump 15+ emits this for any table-less session; harmless but
        # depends on the server version being >= 15 when loading.
        if line.startswith("SET default_table_access_method"):
            continue
        # psql 15.x meta-commands from newer pg_dump (\restrict) would fail
        # on older psql; none are expected, but be safe.
        if line.startswith("\\restrict") or line.startswith("\\unrestrict"):
            continue
        if line.startswith("-- Dumped from database version") or line.startswith(
            "-- Dumped by pg_dump version"
        ):
            continue
        out.append(line)
    text = "\n".join(out).strip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(
            "Create a throw-away PostgreSQL database, run the installed open-webui "
            "package's own migrations on it, and write a schema-only dump (plus the "
            "alembic_version row) that loads into an empty database owned by a "
            "non-superuser. The throw-away database is always dropped."
        ),
        epilog=(
            "Example: .venv-owui/bin/python scripts/dump_owui_schema.py "
            "--database-url postgresql://postgres@127.0.0.1:5432/postgres "
            "--out tests/fixtures/owui_0_12_4_schema.sql"
        ),
    )
    ap.add_argument(
        "--database-url",
        required=True,
        help="URL of an existing database of a role allowed to CREATE DATABASE "
        "(postgresql://user@host:port/dbname); only used to create and drop the "
        "throw-away database.",
    )
    ap.add_argument("--out", required=True, help="output .sql file ('-' for stdout)")
    ap.add_argument(
        "--keep-database",
        action="store_true",
        help="do not drop the throw-away database (for debugging); its name is printed",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="show Open WebUI's migration log")
    args = ap.parse_args(argv)

    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        raise SystemExit("psycopg is missing: run this with the venv of scripts/owui_env.sh") from None
    try:
        owui_version = metadata.version("open-webui")
    except metadata.PackageNotFoundError:
        raise SystemExit("open-webui is not installed: run scripts/owui_env.sh first") from None
    for tool in ("pg_dump",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH")

    admin_url = libpq_url(args.database_url)
    dbname = "owui_schema_" + secrets.token_hex(6)
    db_url = with_database(admin_url, dbname)

    workdir = tempfile.mkdtemp(prefix="owui-schema-")
    created = False
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        created = True
        log(f"created throw-away database {dbname}")

        log(f"running open-webui {owui_version} migrations")
        run_owui_migrations(db_url, workdir, args.verbose)

        with psycopg.connect(db_url) as conn:
            head = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            ntables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone()[0]
        if len(head) != 1:
            raise SystemExit(f"expected one alembic_version row, got {head!r}")
        log(f"migrated to {head[0][0]}, {ntables} tables")

        common = ("--no-owner", "--no-privileges", "--no-comments")
        schema = pg_dump(db_url, "--schema-only", *common)
        data = pg_dump(
            db_url, "--data-only", "--table=public.alembic_version", "--inserts", *common
        )

        # Never record an absolute path of this machine in the fixture.
        shown_out = "<file>" if args.out == "-" else args.out
        if os.path.isabs(shown_out):
            shown_out = os.path.basename(shown_out)
        header = (
            f"-- Open WebUI {owui_version} PostgreSQL schema, as created by its own\n"
            f"-- Alembic migrations (head {head[0][0]}, {ntables} tables), plus the\n"
            "-- alembic_version row so that Open WebUI sees the database as migrated.\n"
            "--\n"
            "-- Generated by (do not edit by hand):\n"
            "--   scripts/owui_env.sh\n"
            "--   .venv-owui/bin/python scripts/dump_owui_schema.py \\\n"
            "--       --database-url postgresql://postgres@127.0.0.1:5432/postgres \\\n"
            f"--       --out {shown_out}\n"
            "-- pg_dump --schema-only --no-owner --no-privileges --no-comments, then\n"
            "-- the INSERT of pg_dump --data-only --table=public.alembic_version --inserts.\n"
            "-- Loads with psql -v ON_ERROR_STOP=1 into an empty database owned by a\n"
            "-- non-superuser role.\n\n"
        )
        inserts = [line for line in data.splitlines() if line.startswith("INSERT INTO ")]
        if len(inserts) != 1:
            raise SystemExit(f"expected one alembic_version INSERT, got {inserts!r}")
        body = (
            header
            + clean_dump(schema)
            + "\n-- alembic_version data (pg_dump --data-only --table=public.alembic_version)\n"
            + inserts[0]
            + "\n\n-- Undo the session settings made above (search_path = '' etc.), in\n"
            "-- case the file is run on a connection that is used afterwards.\n"
            "RESET ALL;\n"
        )
        if args.out == "-":
            sys.stdout.write(body)
        else:
            out_dir = os.path.dirname(args.out)
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(body)
            os.replace(tmp, args.out)
            log(f"wrote {args.out} ({len(body)} bytes)")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if created and not args.keep_database:
            try:
                with psycopg.connect(admin_url, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(dbname)
                        )
                    )
                log(f"dropped throw-away database {dbname}")
            except Exception as exc:  # pragma: no cover - best effort cleanup
                log(f"could not drop throw-away database {dbname}: {exc}")
        elif created:
            log(f"kept throw-away database {dbname}")


if __name__ == "__main__":
    sys.exit(main())
