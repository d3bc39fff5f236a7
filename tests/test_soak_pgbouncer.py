"""tests/pgbouncer.py's PgBouncer, as the soak runs it for minutes: found by the soak (issue 12).

PgBouncer logs every client login and close to its logfile *and*, not daemonized, to stderr. The starter used to
hand it a pipe for stderr that nobody read: after some 64 KiB of log lines (a few hundred connections) the pipe was
full, PgBouncer blocked writing to it, and every pooled client hung until it was restarted.
"""

from __future__ import annotations

import psycopg

from app_adapter import devdb
from tests.pgbouncer import PgBouncer


def test_pgbouncer_keeps_answering_after_a_thousand_connections(pg_server: devdb.Server) -> None:
    bouncer = PgBouncer(pg_server.admin_url, pool_size=2)
    bouncer.start()
    try:
        url = devdb.Server(bouncer.admin_url, "pgbouncer").url("postgres")
        for _ in range(1000):  # two log lines each: far more than a pipe holds
            with psycopg.connect(url, autocommit=True, connect_timeout=5, prepare_threshold=None) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        assert bouncer.log_path.stat().st_size > 128 * 1024
    finally:
        bouncer.close()
