"""The soak's stack, all on loopback, all stopped at the end: a private PostgreSQL 15 cluster (restartable without
touching the shared server), PgBouncer in transaction pooling, a private Redis, moto's KMS behind a fault proxy,
the stub model, and two ``owui-crypto serve`` instances.

Why a private cluster: the soak restarts PostgreSQL (``pg_ctl restart -m fast``) and reads its whole log; the shared
server at 127.0.0.1:5432 serves other people. Serve connects as a role that owns its database and is not a
superuser (pgcrypto is a trusted extension), through PgBouncer.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.pgbouncer import PgBouncer  # noqa: E402

PG_BIN = Path(os.environ.get("SOAK_PG_BIN", "/usr/lib/postgresql/15/bin"))
OWNER_ROLE = "owui_soak_owner"  # owns the database, migrates (serve's OWUI_CRYPTO_OWNER_DATABASE_URL); no superuser
APP_ROLE = "owui_soak"  # what Open WebUI connects as, granted by serve at start (README, "Two roles")
DATABASE = "owui_soak"
CLI = str(Path(sys.executable).with_name("owui-crypto"))

#: Open WebUI offline, as e2e/conftest.py starts it; plus no background generation (titles, tags, follow-ups),
#: so a chat's title changes only when its owner writes it (the ledger compares titles byte for byte).
OFFLINE_ENV = {
    "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "ENABLE_OLLAMA_API": "false", "RAG_EMBEDDING_ENGINE": "openai",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "true", "ENABLE_VERSION_UPDATE_CHECK": "false", "ENABLE_API_KEYS": "true",
    "BYPASS_MODEL_ACCESS_CONTROL": "true", "GLOBAL_LOG_LEVEL": "INFO",
    "ENABLE_TITLE_GENERATION": "false", "ENABLE_TAGS_GENERATION": "false", "ENABLE_FOLLOW_UP_GENERATION": "false",
    "ENABLE_AUTOCOMPLETE_GENERATION": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the OS user postgres then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PrivatePostgres:
    """initdb into ``root``, a free port, the unix socket in ``root``, every statement logged (no parameters)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "pg"
        self.root.mkdir(parents=True)
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.sockets.mkdir()
        self.log_path = self.root / "postgresql.log"
        self.port = free_port()
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, pg.pw_uid, pg.pw_gid)
            root.chmod(0o755)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(_as_postgres([str(PG_BIN / args[0]), *args[1:]]), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")
        settings = {
            "port": str(self.port), "listen_addresses": "'127.0.0.1'", "unix_socket_directories": f"'{self.sockets}'",
            "max_connections": "200", "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "log_statement": "'all'", "log_parameter_max_length": "0", "log_parameter_max_length_on_error": "0",
            "log_error_verbosity": "terse", "log_line_prefix": "'%m [%p] %u@%d '", "log_connections": "off",
            "shared_buffers": "64MB",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# owui-crypto soak\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", "start")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is cut, PostgreSQL comes back on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-m", "fast", "-w", "-t", "60", "restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)

    def sql(self, query: str | sql.Composable, params: tuple | None = None, dbname: str = "postgres") -> list[tuple]:
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def make_app_database(self) -> None:
        """serve's two roles, neither a superuser: the owner owns the database (CREATE there: owui_crypto's schema,
        pgcrypto); the application role gets what serve grants it."""
        for role in (OWNER_ROLE, APP_ROLE):
            self.sql(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(sql.Identifier(role)))
        self.sql(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(OWNER_ROLE)))

    def dump(self, path: Path) -> None:
        """pg_dump of the app database (as superuser: everything, owui_crypto's schema included), plain SQL."""
        done = subprocess.run([str(PG_BIN / "pg_dump"), "--no-owner", "-d", self.url(DATABASE), "-f", str(path)],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {done.stderr[-2000:]}")


class RedisServer:
    """A private redis-server on a free port, nothing persisted."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.dir = root / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir), "--logfile",
                                      str(self.dir / "redis.log")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        _stop(self.proc)


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- KMS: moto behind a fault proxy ------------------------------------------------------------------------------

THROTTLED = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (botocore's read timeout) is no error of the proxy's: no traceback on stderr."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class KmsFaultProxy:
    """An HTTP proxy on loopback in front of moto. Modes: ``pass`` (forward), ``down`` (drop every connection
    without an answer, open ones included), ``throttle`` (HTTP 400 ThrottlingException, as KMS answers)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.mode = "pass"
        self.counts: dict[str, int] = {"pass": 0, "down": 0, "throttle": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy.mode
                with proxy._lock:
                    proxy.counts[mode] += 1
                if mode == "down":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode == "throttle":
                    self._answer(400, {"Content-Type": "application/x-amz-json-1.1"}, THROTTLED)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
                    upstream.request("POST", self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    self._answer(answer.status, {k: v for k, v in answer.getheaders()
                                                 if k.lower() in ("content-type", "x-amzn-requestid")}, data)
                finally:
                    upstream.close()

            do_GET = do_POST

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="kms-proxy")

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- serve instances ---------------------------------------------------------------------------------------------

MIGRATED = "owui-crypto's migrations done"


@dataclass
class Serve:
    """One ``owui-crypto serve``, always on the same port (a restart comes back where the clients look)."""

    name: str
    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    runs: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, **extra: str) -> None:
        self.runs += 1
        (self.workdir / self.name).mkdir(exist_ok=True)
        self.log_path = self.workdir / self.name / f"serve-{self.name}-{self.runs}.log"
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env={**self.env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir / self.name, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""

    def wait_for_log(self, mark: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if mark in self.log():
                return
            self._check_alive()
            time.sleep(0.2)
        raise RuntimeError(f"serve {self.name}: {mark!r} not logged within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"serve {self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"serve {self.name} not healthy within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, in-flight requests and transactions are cut."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Stack:
    """Everything the soak runs against. Build it with :func:`running_stack`."""

    root: Path
    pg: PrivatePostgres
    bouncer: PgBouncer
    redis: RedisServer
    kms: KmsFaultProxy
    kms_upstream: str
    llm_url: str
    serves: dict[str, Serve]

    @property
    def app_url_direct(self) -> str:
        return self.pg.url(DATABASE, APP_ROLE)

    @property
    def app_url_pooled(self) -> str:
        return f"postgresql://{APP_ROLE}@127.0.0.1:{self.bouncer.port}/{DATABASE}"

    @property
    def superuser_url(self) -> str:
        return self.pg.url(DATABASE)


def serve_env(*, database_url: str, owner_url: str, redis_url: str, kms_url: str, llm_url: str, secret: str,
              workdir: Path, name: str, key_ttl: int) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV,
           "DATABASE_URL": database_url, "OWUI_CRYPTO_OWNER_DATABASE_URL": owner_url,
           "OWUI_CRYPTO_TRANSACTION_POOLER": "true",  # PgBouncer 1.18 keeps no prepared statements
           "WEBUI_SECRET_KEY": secret, "DATA_DIR": str(workdir / name / "data"),
           "REDIS_URL": redis_url, "WEBSOCKET_MANAGER": "redis", "ENABLE_WEBSOCKET_SUPPORT": "true",
           "ENABLE_OPENAI_API": "true", "OPENAI_API_BASE_URLS": llm_url, "OPENAI_API_KEYS": "soak-stub",
           "AWS_ENDPOINT_URL_KMS": kms_url,  # through the fault proxy
           "OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS": str(key_ttl),
           "OWUI_CRYPTO_KMS_CONNECT_TIMEOUT": "1", "OWUI_CRYPTO_KMS_READ_TIMEOUT": "2",
           "OWUI_CRYPTO_KMS_MAX_ATTEMPTS": "2", "PYTHONUNBUFFERED": "1"}
    for variable in ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS", "DATABASE_TYPE",
                     "OWUI_CRYPTO_METRICS_PORT", "WEBSOCKET_REDIS_URL"):
        env.pop(variable, None)
    return env


@contextlib.contextmanager
def running_stack(root: Path, *, key_ttl: int, log: callable = print,  # type: ignore[valid-type]
                  startup_timeout: float = 400):
    """Bring the whole stack up (instance a migrates first, b starts once a's migrations are committed); stop
    everything on exit, also on Ctrl-C or an exception."""
    from app_adapter.devstack import kms_emulator
    from e2e.llm_stub import LlmStub

    with contextlib.ExitStack() as stack:
        pg = PrivatePostgres(root)
        stack.callback(pg.stop)
        pg.init()
        pg.start()
        pg.make_app_database()
        log(f"stack: private PostgreSQL 15 on 127.0.0.1:{pg.port} (log {pg.log_path})")
        bouncer = PgBouncer(pg.admin_url, pool_size=20, users=[OWNER_ROLE, APP_ROLE], max_client_conn=400)
        stack.callback(bouncer.close)
        bouncer.start()
        redis = RedisServer(root)
        stack.callback(redis.stop)
        redis.start()
        kms_endpoint, _, _ = stack.enter_context(kms_emulator())
        proxy = KmsFaultProxy(kms_endpoint)
        proxy.start()
        stack.callback(proxy.stop)
        llm = stack.enter_context(LlmStub())
        log(f"stack: PgBouncer :{bouncer.port}, Redis :{redis.port}, moto {kms_endpoint} behind proxy {proxy.url}, "
            f"stub model {llm.base_url}")
        secret = "soak-" + os.urandom(24).hex()
        pooled = f"postgresql://{APP_ROLE}@127.0.0.1:{bouncer.port}/{DATABASE}"
        owner = f"postgresql://{OWNER_ROLE}@127.0.0.1:{bouncer.port}/{DATABASE}"
        serves = {name: Serve(name, serve_env(database_url=pooled, owner_url=owner, redis_url=redis.url,
                                              kms_url=proxy.url,
                                              llm_url=llm.base_url, secret=secret, workdir=root, name=name,
                                              key_ttl=key_ttl), root)
                  for name in ("a", "b")}
        for serve in serves.values():
            stack.callback(serve.stop)
        started = time.monotonic()
        serves["a"].spawn()
        serves["a"].wait_for_log(MIGRATED, startup_timeout)
        serves["b"].spawn(ENABLE_DB_MIGRATIONS="false")
        serves["a"].wait_healthy(startup_timeout)
        serves["b"].wait_healthy(startup_timeout)
        log(f"stack: serve a {serves['a'].base_url}, b {serves['b'].base_url}, healthy after "
            f"{time.monotonic() - started:.0f} s")
        yield Stack(root, pg, bouncer, redis, proxy, kms_endpoint, llm.base_url, serves)
