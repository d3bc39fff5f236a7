"""Reading the PostgreSQL server's log from the tests.

The canary tests need what the server wrote while they ran. Where the log is:
``OWUI_CRYPTO_SERVER_LOG`` if set; else ``pg_current_logfile()`` (logging
collector on); else Debian's ``/var/log/postgresql/postgresql-<cluster>.log``.
If none is readable the test fails and says so: it is never skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg


def server_log_path(conn: psycopg.Connection) -> Path:
    tried = []
    explicit = os.environ.get("OWUI_CRYPTO_SERVER_LOG")
    if explicit:
        return Path(explicit)
    current, data_dir, cluster = conn.execute(
        "SELECT pg_current_logfile(), current_setting('data_directory'), current_setting('cluster_name')").fetchone()
    candidates = []
    if current:
        candidates.append(Path(data_dir) / current)
    if cluster:
        candidates.append(Path("/var/log/postgresql") / f"postgresql-{cluster.replace('/', '-')}.log")
    for path in candidates:
        if os.access(path, os.R_OK):
            return path
        tried.append(str(path))
    raise AssertionError("cannot read the PostgreSQL server log (tried: " + ", ".join(tried or ["nothing"])
                         + "); set OWUI_CRYPTO_SERVER_LOG to its path")


class LogWindow:
    """What the server log gained since this object was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size

    def read(self) -> str:
        with self.path.open("rb") as handle:
            handle.seek(self.start)
            return handle.read().decode("utf-8", "replace")


def key_forms(key: bytes) -> list[str]:
    """The ways a 32-byte key could be spelled in a log."""
    import base64

    return [key.hex(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode(),
            base64.b64encode(key).decode().rstrip("=")]
