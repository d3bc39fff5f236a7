"""A ``pg_dump`` of the public schema restored into a fresh database, as after a disaster.

Shared by the recovery tests (``tests/test_recover.py``) and the e2e test that
imports what was recovered back into Open WebUI (``e2e/test_recover.py``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg

from app_adapter.devdb import Server


def restore_list(listing: str) -> str:
    """``pg_restore --list`` output without what a fresh database without owui-crypto cannot take.

    The public tables' ``owui_crypto_seal_direct`` triggers call functions of
    the ``owui_crypto`` schema, which a dump of public does not hold; the
    schema entry of public itself already exists in a fresh database. The
    same filter is given in README's recovery steps.
    """
    return "\n".join(line for line in listing.splitlines()
                     if " TRIGGER " not in line and " SCHEMA - public " not in line) + "\n"


def restore_public_dump(pg_server: Server, source_url: str, workdir: Path) -> str:
    """Dump ``source_url``'s public schema, restore it into a new database; returns its libpq URL.

    Asserts that the restored database has no owui_crypto schema and no
    pgcrypto: recovery must work without either. The caller drops it.
    """
    dump = workdir / "public.dump"
    subprocess.run(["pg_dump", "--schema=public", "--no-owner", "--no-privileges", "--format=custom",
                    f"--file={dump}", source_url], check=True, capture_output=True, timeout=300)
    listing = subprocess.run(["pg_restore", "--list", str(dump)], check=True, capture_output=True, text=True).stdout
    kept = workdir / "restore.list"
    kept.write_text(restore_list(listing))
    name = pg_server.create_database("owui_crypto_t_restored")
    url = pg_server.url(name)
    subprocess.run(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", f"--use-list={kept}",
                    f"--dbname={url}", str(dump)], check=True, capture_output=True, timeout=300)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'owui_crypto%'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pgcrypto'").fetchone() == (0,)
    return url
