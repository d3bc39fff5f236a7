"""A PgBouncer in transaction pooling mode in front of the test server.

Installed from Debian's packages by ``scripts/services.sh`` (``make test``
runs it). Started per test session on a free loopback port; stopped after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from app_adapter import devdb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pgbouncer(pg_server: devdb.Server) -> Iterator[devdb.Server]:
    """A :class:`devdb.Server` whose URLs go through PgBouncer (pool_mode=transaction)."""
    with running_pgbouncer(pg_server) as server:
        yield server


@contextlib.contextmanager
def running_pgbouncer(pg_server: devdb.Server, *, pool_size: int = 4,
                      users: Sequence[str] = ()) -> Iterator[devdb.Server]:
    """PgBouncer in transaction pooling in front of ``pg_server``, stopped on exit.

    ``pool_size`` server connections per database and user (1: every client of a
    user shares one backend, as the pooler attack tests need); ``users`` are
    further roles allowed to connect (trust auth still wants them listed).
    """
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if binary is None:
        pytest.fail("pgbouncer is not installed: run `make test` (scripts/services.sh installs it from Debian)")
    target = urlsplit(pg_server.admin_url)
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="owui-crypto-pgbouncer-"))
    user = target.username or "postgres"
    password = f" password={target.password}" if target.password else ""
    (workdir / "users.txt").write_text(f'"{user}" "{target.password or ""}"\n' + "".join(f'"{u}" ""\n' for u in users))
    (workdir / "pgbouncer.ini").write_text(f"""
[databases]
* = host={target.hostname or '127.0.0.1'} port={target.port or 5432}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / 'users.txt'}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
logfile = {workdir / 'pgbouncer.log'}
pidfile = {workdir / 'pgbouncer.pid'}
""")
    command = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        workdir.chmod(0o777)
        for f in workdir.iterdir():
            f.chmod(0o666)
        command[1:1] = ["-u", "postgres"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"pgbouncer exited: {proc.stdout.read().decode(errors='replace')}")
        time.sleep(0.05)
    netloc = f"{target.username or 'postgres'}{':' + target.password if target.password else ''}@127.0.0.1:{port}"
    try:
        yield devdb.Server(urlunsplit(target._replace(netloc=netloc)), "pgbouncer (transaction pooling)")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
