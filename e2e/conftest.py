"""End-to-end harness: the real Open WebUI, started by ``owui-crypto serve``.

Runs in ``.venv-owui`` (open-webui 0.12.4 + this project; ``make e2e``).
One session brings up, and tears down:

* a throw-away PostgreSQL database on the server ``app_adapter.devdb``
  finds, with ``log_statement = all`` and ``log_parameter_max_length = 0``
  set on it (``ALTER DATABASE``, as superuser);
* moto as KMS over HTTP (``tests.kms_fixtures``: one HMAC_512 and one
  SYMMETRIC_DEFAULT key; boto3 pointed at it by its standard variables);
* a stub OpenAI-compatible model on loopback (``e2e.llm_stub``), so chat
  completions run for real;
* ``owui-crypto serve`` as a subprocess on a free loopback port, offline, with two roles of this run's own:
  it migrates as a non-superuser owner and serves Open WebUI as a granted application role (README, "Two roles").

Start-up time and the suite's run time are printed at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from app_adapter import devdb
from app_adapter.devdb import Roles, database_roles
from e2e.llm_stub import LlmStub
from tests.kms_fixtures import kms_server  # noqa: F401  (fixture: moto's KMS over HTTP)
from tests.serverlog import LogWindow, server_log_path

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = float(os.environ.get("E2E_STARTUP_TIMEOUT", "300"))
TIMINGS: dict[str, float] = {}
_SESSION_STARTED = time.monotonic()

#: Open WebUI started offline: no model downloads, no version check, no LLM backends.
OFFLINE_ENV = {
    "OFFLINE_MODE": "true",
    "HF_HUB_OFFLINE": "1",
    "ENABLE_OLLAMA_API": "false",
    "RAG_EMBEDDING_ENGINE": "openai",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
    "ENABLE_VERSION_UPDATE_CHECK": "false",
    "ENABLE_API_KEYS": "true",
    "BYPASS_MODEL_ACCESS_CONTROL": "true",  # every user may use the stub model
    "GLOBAL_LOG_LEVEL": "INFO",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Owui:
    """The running server."""

    base_url: str
    database: str
    database_url: str  # libpq URL, superuser
    log_path: Path
    process: subprocess.Popen
    env: dict[str, str] = field(repr=False)
    startup_seconds: float = 0.0

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kw)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def sql(self, query: str, params: tuple | dict | None = None) -> list[tuple]:
        """As superuser on the base tables (plain search_path): what a database reader sees."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="session")
def pg_server() -> Iterator[devdb.Server]:
    server = devdb.find_server()
    yield server
    if server.keepalive is not None:
        server.keepalive.stop()


@pytest.fixture(scope="session")
def e2e_roles(pg_server: devdb.Server) -> Iterator[Roles]:
    """The roles of every serve this session starts with two roles (all but the tests of one role)."""
    with database_roles(pg_server) as roles:
        yield roles


@contextlib.contextmanager
def logged_database(pg_server: devdb.Server, prefix: str, owner: str | None = None) -> Iterator[str]:
    """A throw-away database whose every statement is logged (its parameters are not: the README's setting)."""
    name = pg_server.create_database(prefix, owner=owner)
    with pg_server.connect() as conn:  # superuser-only settings, on this database only
        conn.execute(sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(sql.Identifier(name)))
        conn.execute(sql.SQL("ALTER DATABASE {} SET log_parameter_max_length = 0").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="session")
def e2e_database(pg_server: devdb.Server, e2e_roles: Roles) -> Iterator[str]:
    with logged_database(pg_server, "owui_crypto_e2e", owner=e2e_roles.owner) as name:
        yield name


@pytest.fixture(scope="session")
def pg_log(pg_server: devdb.Server) -> LogWindow:
    """The PostgreSQL server log from before Open WebUI first connects."""
    with pg_server.connect() as conn:
        return LogWindow(server_log_path(conn))


@pytest.fixture(scope="session")
def llm() -> Iterator[LlmStub]:
    with LlmStub() as stub:
        yield stub


@pytest.fixture(scope="session")
def owui(pg_server: devdb.Server, e2e_database: str, e2e_roles: Roles, kms_server, pg_log: LogWindow,  # noqa: F811
         llm: LlmStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owui]:
    """The session's Open WebUI: serve with two roles, Open WebUI as the granted application role."""
    extra = {"OWUI_CRYPTO_METRICS_PORT": str(free_port())}  # the exporter, on loopback (e2e/test_metrics.py)
    handle = start_owui(pg_server.url(e2e_database), e2e_database, llm, tmp_path_factory.mktemp("owui"), extra,
                        roles=e2e_roles)
    try:
        TIMINGS["owui_startup_s"] = handle.startup_seconds
        for key, pattern in (("owui_import_s", r"Open WebUI imported in ([\d.]+) s"),
                             ("serve_ready_s", r"ready to serve after ([\d.]+) s")):
            match = re.search(pattern, handle.log())
            if match:
                TIMINGS[key] = float(match.group(1))
        yield handle
    finally:
        stop_owui(handle)
        kept = Path(tempfile.gettempdir()) / "owui-crypto-e2e-serve.log"
        kept.write_bytes(handle.log_path.read_bytes())  # for a look after the run


def wait_healthy(handle: Owui, started: float | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until ``/health`` answers 200; fails with the end of serve's log if it exits or takes over ``timeout``."""
    started = time.monotonic() if started is None else started
    while time.monotonic() - started < timeout:
        if handle.process.poll() is not None:
            raise AssertionError(f"owui-crypto serve exited with {handle.process.returncode}:\n{handle.log()[-6000:]}")
        try:
            if httpx.get(handle.base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Open WebUI not healthy after {timeout:.0f} s:\n{handle.log()[-6000:]}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """e2e/test_metrics.py last (a stable sort: the rest keep their order): it reads what the whole session
    counted, and signs in as test_owui.py's admin, whose sign-up must stay the server's first."""
    items.sort(key=lambda item: item.path.name == "test_metrics.py")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    TIMINGS["suite_s"] = time.monotonic() - _SESSION_STARTED
    terminalreporter.write_sep("=", "owui-crypto e2e timings")
    labels = {"owui_startup_s": "Open WebUI start-up (spawn to /health 200)",
              "owui_import_s": "  of which: importing open_webui.main",
              "serve_ready_s": "  of which: serve() until hooks installed",
              "signup_s": "sign-up (POST /api/v1/auths/signup, incl. KMS + PBKDF2)",
              "get_chat_ms": "GET /api/v1/chats/{id}, median of 30",
              "list_chats_ms": "GET /api/v1/chats/list, median of 30",
              "search_ms": "GET /api/v1/chats/search?text=, median of 30",
              "suite_s": "e2e suite run time"}
    for key, label in labels.items():
        if key in TIMINGS:
            unit = "ms" if key.endswith("_ms") else "s"
            terminalreporter.write_line(f"{label}: {TIMINGS[key]:.1f} {unit}")


# -- the browser test's own Open WebUI (e2e/test_browser.py) --------------------------------------
#
# The browser test signs up in the web interface as a new user would, and Open WebUI makes the
# first sign-up its admin and then closes sign-ups. test_owui.py's Alice must be that first
# sign-up on the session server, so the browser test gets a server and a database of its own
# (started when the module starts, stopped when it ends): its pg_dump then holds only what the
# browser wrote. Channels are off by default in Open WebUI 0.12.4; this server turns them on.

import hashlib  # noqa: E402  (appended with the browser fixtures)
import json  # noqa: E402
import typing  # noqa: E402

from e2e.llm_stub import _Handler as _LlmStubHandler  # noqa: E402

BROWSER_OWUI_ENV = {"ENABLE_CHANNELS": "true"}

if typing.TYPE_CHECKING:  # selenium is imported only where a browser is asked for
    from e2e.browser import BrowserFactory


def start_owui(url: str, database: str, llm: LlmStub, workdir: Path, extra_env: dict[str, str],
               roles: Roles | None = None) -> Owui:
    """``owui-crypto serve`` on a free loopback port against ``url`` (a superuser's: the handle's ``sql`` reads
    with it), offline, healthy. With ``roles`` it migrates as their owner and serves as their application role;
    without, as ``url``'s role alone."""
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, **extra_env,
           **(roles.env(url) if roles else {"DATABASE_URL": url}),
           "WEBUI_SECRET_KEY": "e2e-" + os.urandom(24).hex(),
           "DATA_DIR": str(workdir / "data"),
           "ENABLE_OPENAI_API": "true", "OPENAI_API_BASE_URLS": llm.base_url, "OPENAI_API_KEYS": "e2e-stub",
           "PYTHONUNBUFFERED": "1"}
    for name in ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS", "DATABASE_TYPE"):
        env.pop(name, None)
    log_path = workdir / "serve.log"
    cli = Path(sys.executable).with_name("owui-crypto")
    started = time.monotonic()
    with log_path.open("wb") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                   env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir)
    handle = Owui(f"http://127.0.0.1:{port}", database, url, log_path, process, env)
    try:
        wait_healthy(handle, started)
    except BaseException:
        stop_owui(handle)
        raise
    handle.startup_seconds = time.monotonic() - started
    return handle


def stop_owui(handle: Owui) -> None:
    handle.process.terminate()
    try:
        handle.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        handle.process.kill()
        handle.process.wait()


class _EmbeddingStubHandler(_LlmStubHandler):
    """The stub model, plus ``POST /v1/embeddings``: Open WebUI embeds every memory it saves (with
    ``RAG_EMBEDDING_ENGINE=openai`` at ``RAG_OPENAI_API_BASE_URL``, api.openai.com unless told),
    so the browser test's server embeds on loopback. A vector is a hash of the text's words."""

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/embeddings"):
            super().do_POST()
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        texts = body.get("input") or []
        texts = [texts] if isinstance(texts, str) else texts
        self._json({"object": "list", "model": body.get("model", "stub-embedding"),
                    "data": [{"object": "embedding", "index": i, "embedding": _word_vector(str(text))}
                             for i, text in enumerate(texts)],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1}})


def _word_vector(text: str, dims: int = 16) -> list[float]:
    vector = [0.0] * dims
    for word in text.lower().split():
        vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % dims] += 1.0
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


@pytest.fixture(scope="module")
def browser_llm() -> Iterator[LlmStub]:
    """The stub model for the browser test's server, answering embeddings too."""
    stub = LlmStub()
    stub.server.RequestHandlerClass = _EmbeddingStubHandler
    with stub:
        yield stub


@pytest.fixture(scope="module")
def browser_database(pg_server: devdb.Server, e2e_roles: Roles) -> Iterator[str]:
    """A database of its own for the browser test, logged as the session's (``log_statement = all``)."""
    with logged_database(pg_server, "owui_crypto_e2e_browser", owner=e2e_roles.owner) as name:
        yield name


@pytest.fixture(scope="module")
def browser_pg_log(pg_server: devdb.Server) -> LogWindow:
    """The PostgreSQL server log from before the browser test's Open WebUI first connects."""
    with pg_server.connect() as conn:
        return LogWindow(server_log_path(conn))


@pytest.fixture(scope="module")
def browser_owui(pg_server: devdb.Server, browser_database: str, e2e_roles: Roles, kms_server,  # noqa: F811
                 browser_pg_log: LogWindow, browser_llm: LlmStub,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owui]:
    """Open WebUI behind ``owui-crypto serve`` for the browser test alone: channels on, embeddings on loopback."""
    workdir = tmp_path_factory.mktemp("owui-browser")
    env = {**BROWSER_OWUI_ENV, "RAG_OPENAI_API_BASE_URL": browser_llm.base_url, "RAG_OPENAI_API_KEY": "e2e-stub"}
    handle = start_owui(pg_server.url(browser_database), browser_database, browser_llm, workdir, env, roles=e2e_roles)
    TIMINGS["browser_owui_startup_s"] = handle.startup_seconds
    try:
        yield handle
    finally:
        stop_owui(handle)
        kept = Path(tempfile.gettempdir()) / "owui-crypto-e2e-browser-serve.log"
        kept.write_bytes(handle.log_path.read_bytes())


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """e2e/artifacts/browser/: the browser test's screenshots (gitignored), emptied at the start."""
    import shutil

    path = REPO / "e2e" / "artifacts" / "browser"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def browsers(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserFactory]:
    """Opens headless Chromium windows, each with a fresh profile; quits them all at the end."""
    from e2e.browser import BrowserFactory

    factory = BrowserFactory(artifacts, tmp_path_factory.mktemp("chromium"))
    try:
        yield factory
    finally:
        factory.quit_all()
