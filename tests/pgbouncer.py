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
    bouncer = PgBouncer(pg_server.admin_url, pool_size=pool_size, users=users)
    try:
        bouncer.start()
    except PgBouncerError as exc:
        pytest.fail(str(exc))
    try:
        yield devdb.Server(bouncer.admin_url, "pgbouncer (transaction pooling)")
    finally:
        bouncer.close()


class PgBouncerError(RuntimeError):
    """PgBouncer is missing or did not start."""


class PgBouncer:
    """Debian's PgBouncer in transaction pooling in front of the server at ``target_url``, on one loopback port
    for its whole life: :meth:`restart` brings it back on the same port (the soak restarts it under load)."""

    def __init__(self, target_url: str, *, pool_size: int = 4, users: Sequence[str] = (),
                 max_client_conn: int = 200) -> None:
        self.binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer")
                                                    else None)
        self.target = urlsplit(target_url)
        self.port = _free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="owui-crypto-pgbouncer-"))
        self.log_path = self.workdir / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None
        user = self.target.username or "postgres"
        password = f" password={self.target.password}" if self.target.password else ""
        (self.workdir / "users.txt").write_text(f'"{user}" "{self.target.password or ""}"\n'
                                                + "".join(f'"{u}" ""\n' for u in users))
        (self.workdir / "pgbouncer.ini").write_text(f"""
[databases]
* = host={self.target.hostname or '127.0.0.1'} port={self.target.port or 5432}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.workdir / 'users.txt'}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = {max_client_conn}
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
logfile = {self.log_path}
pidfile = {self.workdir / 'pgbouncer.pid'}
""")
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            self.workdir.chmod(0o777)
            for f in self.workdir.iterdir():
                f.chmod(0o666)

    @property
    def admin_url(self) -> str:
        """The target's URL with PgBouncer's address in place of the server's."""
        target = self.target
        netloc = f"{target.username or 'postgres'}{':' + target.password if target.password else ''}" \
                 f"@127.0.0.1:{self.port}"
        return urlunsplit(target._replace(netloc=netloc))

    def start(self, timeout: float = 10) -> None:
        if self.binary is None:
            raise PgBouncerError("pgbouncer is not installed: run `make test` "
                                 "(scripts/services.sh installs it from Debian)")
        command = [self.binary, str(self.workdir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "postgres"]
        # Its log lines go to logfile and, not daemonized, to stderr too: never a pipe nobody reads (it fills and
        # PgBouncer blocks on it: tests/test_soak_pgbouncer.py).
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise PgBouncerError(f"pgbouncer exited with {self.proc.returncode}: {log}")
            time.sleep(0.05)
        raise PgBouncerError(f"pgbouncer did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop (every client connection drops; killed if still there after 2 s) and start again on the same
        port."""
        self.stop(timeout=2)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
