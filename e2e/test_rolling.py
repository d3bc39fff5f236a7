"""A rolling upgrade (issue 10): two ``owui-crypto serve`` instances share one database and one Redis
(``WEBSOCKET_MANAGER=redis``, a Redis database of this test's own), and one of them migrates Open WebUI's schema
while the other keeps answering the chats' owner.

The same open-webui release plays both the old and the new one. Instance A starts on a fresh database (every
migration); B starts once they are done, without migrating (``ENABLE_DB_MIGRATIONS=false``: the old release). A gets
an admin, an owner and the owner's chats, and stops. Then Open WebUI's own Alembic project takes the schema back
``ROLLED_BACK`` revisions (its ``downgrade``: the ``message`` table, a protected table, loses its ``app_id`` column,
the ``app`` table and an index on ``file`` go), and owui-crypto's views are rebuilt for that older schema: the state
an older release left, which B serves. A starts again, the new release: it runs those migrations
(``ALTER TABLE message ADD COLUMN app_id``, ``CREATE TABLE app``, ``CREATE INDEX`` on ``file``, ...) and then
owui-crypto's (a refresh of every view), while B's owner reads chats by id and lists them from three threads. A is
stopped once both are committed: the rest of its start (importing Open WebUI) is not part of the upgrade. The
revisions are the newest ones whose undoing leaves B's own queries working: older ones take away ``chat`` and
``auth`` columns that this release's ORM selects, which a real old release would not.

Counted: every request B answers, non-200 answers, answers carrying ciphertext (``oc1:``) or placeholders
(``[encrypted]``) or another title than the chat's, and -- from a plain database session with Open WebUI's
search_path -- how often a protected table's name resolved to anything but its view. The counts are printed (run
with ``-s``) and kept in ``$TMPDIR/owui-crypto-e2e-rolling.txt`` with A's log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from app_adapter import devdb
from e2e.conftest import OFFLINE_ENV, Owui, free_port, stop_owui, wait_healthy
from e2e.llm_stub import LlmStub
from e2e.owui_api import Chat, User, add_user, new_chat, ok, signup

#: Open WebUI 0.12.4's newest revisions, newest first; the upgrade re-applies them.
HEAD = "0bd252b206fb"  # add_missing_auth_rows
ROLLED_BACK = ("0bd252b206fb", "c92da83b017f", "b8f2c6d91a04")  # + add_apps (message.app_id), file index
TARGET = "f8c0e5b134cd"  # what the downgrade leaves
REDIS_DBS = range(15, 7, -1)  # Redis databases this test may claim, one per run (runs may overlap)
REDIS_CLAIM = "owui-crypto-e2e-rolling"  # the key that marks a database as this run's
LOAD_LIMIT_S = 150.0  # the load loop's bounds: time ...
LOAD_LIMIT_REQUESTS = 50_000  # ... and requests
CLI = str(Path(sys.executable).with_name("owui-crypto"))

DOWNGRADE = """
import sys
from alembic import command
from alembic.config import Config
from open_webui.env import OPEN_WEBUI_DIR

config = Config(str(OPEN_WEBUI_DIR / "alembic.ini"))
config.set_main_option("script_location", str(OPEN_WEBUI_DIR / "migrations"))
command.downgrade(config, sys.argv[1])
"""


@dataclass
class Cluster:
    """What both instances share."""

    url: str  # libpq, superuser
    redis_url: str
    llm: LlmStub
    workdir: Path
    secret: str = field(default_factory=lambda: "e2e-rolling-" + os.urandom(24).hex())

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = {**os.environ, **OFFLINE_ENV,
               "DATABASE_URL": self.url, "WEBUI_SECRET_KEY": self.secret,  # the same on every instance
               "DATA_DIR": str(self.workdir / name / "data"),
               "REDIS_URL": self.redis_url, "WEBSOCKET_MANAGER": "redis", "ENABLE_WEBSOCKET_SUPPORT": "true",
               "ENABLE_OPENAI_API": "true", "OPENAI_API_BASE_URLS": self.llm.base_url, "OPENAI_API_KEYS": "e2e-stub",
               "PYTHONUNBUFFERED": "1"}
        for variable in ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS", "DATABASE_TYPE",
                         "OWUI_CRYPTO_METRICS_PORT", "WEBSOCKET_REDIS_URL"):
            env.pop(variable, None)
        return {**env, **extra}

    def spawn(self, name: str, run: int, **extra: str) -> Owui:
        """``owui-crypto serve`` on a free loopback port; not waited for."""
        (self.workdir / name).mkdir(exist_ok=True)
        log_path = self.workdir / name / f"serve-{run}.log"
        port = free_port()
        env = self.env(name, **extra)
        with log_path.open("wb") as log_file:  # the child keeps its own descriptor
            process = subprocess.Popen([CLI, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                       stdout=log_file, stderr=subprocess.STDOUT, cwd=self.workdir / name)
        return Owui(f"http://127.0.0.1:{port}", "", self.url, log_path, process, env)

    def sql(self, query: str, params: tuple | None = None) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


MIGRATING = "running Open WebUI's migrations"
MIGRATED = "owui-crypto's migrations done"  # Open WebUI's and owui-crypto's, both committed


def wait_for_log(handle: Owui, *marks: str, timeout: float = 180) -> dict[str, float]:
    """When (monotonic, to within 20 ms) each of ``marks`` first showed in the instance's log; waits for the last."""
    seen: dict[str, float] = {}
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        text = handle.log()
        for mark in marks:
            if mark not in seen and mark in text:
                seen[mark] = time.monotonic()
        if len(seen) == len(marks):
            return seen
        if handle.process.poll() is not None:
            raise AssertionError(f"owui-crypto serve exited with {handle.process.returncode}:\n{text[-6000:]}")
        time.sleep(0.02)
    raise AssertionError(f"{marks[-1]!r} not in the log after {timeout:.0f} s:\n{handle.log()[-6000:]}")


@dataclass
class Load:
    """The owner's reads on B, from several threads, until told to stop."""

    base_url: str
    owner: User
    chats: list[Chat]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    non_200: list[str] = field(default_factory=list)
    ciphertext: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered), monotonic
    slowest_s: float = 0.0

    def worker(self, offset: int) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        titles = {c.id: c.title for c in self.chats}
        with httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.owner.token}"},
                          timeout=60) as client:
            i = offset
            while not self.stop.is_set() and time.monotonic() < deadline and self.requests < LOAD_LIMIT_REQUESTS:
                chat = self.chats[i % len(self.chats)]
                path = "/api/v1/chats/list" if i % 3 == 2 else f"/api/v1/chats/{chat.id}"
                sent = time.monotonic()
                try:
                    response = client.get(path)
                    status, text = response.status_code, response.text
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                answered = time.monotonic()
                with self.lock:
                    self.requests += 1
                    self.spans.append((sent, answered))
                    self.slowest_s = max(self.slowest_s, answered - sent)
                    if status != 200:
                        self.non_200.append(f"{path}: {status} {text[:300]}")
                    elif "oc1:" in text or "[encrypted]" in text:
                        self.ciphertext.append(f"{path}: {text[:300]}")
                    elif path == "/api/v1/chats/list":
                        listed = {c["id"]: c["title"] for c in response.json()}
                        if any(listed.get(k) != v for k, v in titles.items()):
                            self.wrong.append(f"{path}: {text[:300]}")
                    elif response.json().get("title") != chat.title:
                        self.wrong.append(f"{path}: {text[:300]}")
                i += 1

    def during(self, start: float, end: float) -> int:
        """Requests in flight at some moment of [start, end]."""
        return sum(1 for sent, answered in self.spans if sent <= end and answered >= start)


@dataclass
class Resolver:
    """A session with Open WebUI's search_path that asks, over and over, what each protected table's name means."""

    url: str
    tables: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    checks: int = 0
    misses: list[str] = field(default_factory=list)

    #: ``to_regclass`` resolves a name with the newest catalog, the ``pg_class`` join reads the statement's
    #: snapshot: a view rebuilt and committed between the two resolves (``oid``) yet is not in the snapshot
    #: (``schema`` NULL). That name did resolve, to a view newer than the statement, so it is asked again.
    QUERY = ("SELECT t, to_regclass(t)::oid, (SELECT relnamespace::regnamespace::text FROM pg_class"
             " WHERE oid = to_regclass(t)) FROM unnest(%s::text[]) AS t")

    def run(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        with psycopg.connect(self.url, autocommit=True, options="-c search_path=owui_crypto_view,public") as conn:
            pending = list(self.tables)
            while not self.stop.is_set() and time.monotonic() < deadline:
                newer = []
                for name, oid, schema in conn.execute(self.QUERY, (pending,)):
                    if oid is not None and schema is None:
                        newer.append(name)
                        continue
                    self.checks += 1
                    if schema != "owui_crypto_view":
                        self.misses.append(f"{name} -> {schema}")
                pending = newer or list(self.tables)
                if not newer:
                    time.sleep(0.005)


def claim_redis_db() -> redis.Redis:
    """An empty Redis database of the local server (Debian's redis-server), marked as this run's."""
    for db in REDIS_DBS:
        store = redis.Redis.from_url(f"redis://127.0.0.1:6379/{db}")
        if store.dbsize() == 0 and store.set(REDIS_CLAIM, str(os.getpid()), nx=True, ex=900):
            if store.dbsize() == 1:
                return store
            store.delete(REDIS_CLAIM)  # somebody else writes there too
        store.close()
    raise AssertionError(f"no empty Redis database among {list(REDIS_DBS)} at 127.0.0.1:6379")


@pytest.fixture
def cluster(pg_server: devdb.Server, kms_server, llm: LlmStub,  # kms_server: moto's KMS, through the environment
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    store = claim_redis_db()
    name = pg_server.create_database("owui_crypto_e2e_rolling")
    try:
        yield Cluster(pg_server.url(name), f"redis://127.0.0.1:6379/{store.connection_pool.connection_kwargs['db']}",
                      llm, tmp_path_factory.mktemp("rolling"))
    finally:
        pg_server.drop_database(name)
        store.flushdb()  # Open WebUI's keys and the claim
        store.close()


def test_one_instance_migrates_while_the_other_serves_plaintext(cluster: Cluster) -> None:
    started = time.monotonic()
    # 1. A, first start: every migration of Open WebUI and owui-crypto. B starts once they are done (it does not
    #    migrate: it plays the old release) and imports Open WebUI alongside A. Then an admin, an owner, chats.
    a = cluster.spawn("a", 1)
    b: Owui | None = None
    a2: Owui | None = None
    try:
        wait_for_log(a, MIGRATED)
        b = cluster.spawn("b", 1, ENABLE_DB_MIGRATIONS="false")
        wait_healthy(a)
        with a.client() as anonymous:
            admin = signup(anonymous, "Ada Admin", "ada@example.com", "rolling-Pw-12345")
            with a.client(admin.token) as c:
                owner = add_user(c, "Olivia Owner", "olivia@example.com", "rolling-Pw-12345", anonymous)
        with a.client(owner.token) as c:
            chats = [new_chat(c, owner, f"rolling {i}", n_messages=2) for i in range(4)]
        stop_owui(a)
        assert cluster.sql("SELECT version_num FROM alembic_version") == [(HEAD,)]
        wait_healthy(b)

        # 2. The schema of the older release, with A stopped: Open WebUI's own downgrade, then views built for it.
        cluster.sql("SELECT owui_crypto.detach()")  # the downgrade drops message.app_id, which the view reads
        env = cluster.env("downgrade", DATABASE_URL=cluster.url.replace("postgresql://", "postgresql+psycopg://", 1))
        (cluster.workdir / "downgrade").mkdir()
        done = subprocess.run([sys.executable, "-c", DOWNGRADE, TARGET], env=env, cwd=cluster.workdir / "downgrade",
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        cluster.sql("SELECT owui_crypto.refresh()")
        assert cluster.sql("SELECT version_num FROM alembic_version") == [(TARGET,)]
        assert cluster.sql("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' "
                           "AND table_name = 'message' AND column_name = 'app_id'") == [(0,)]
        assert cluster.sql("SELECT count(*) FROM owui_crypto.drift()") == [(0,)]
        tables = [t for (t,) in cluster.sql("SELECT table_name::text FROM owui_crypto.protected_table ORDER BY 1")]
        with b.client(owner.token) as c:  # B serves the older schema
            assert ok(c.get(f"/api/v1/chats/{chats[0].id}")).json()["title"] == chats[0].title

        # 3. A again, the upgraded release: it migrates while B answers the owner. Its start goes on to import
        #    Open WebUI, which is not part of the upgrade: it is stopped once both migrations are committed.
        load = Load(b.base_url, owner, chats)
        resolver = Resolver(cluster.url, tables)
        threads = [threading.Thread(target=load.worker, args=(n,), daemon=True) for n in range(3)]
        threads.append(threading.Thread(target=resolver.run, daemon=True))
        try:
            for thread in threads:
                thread.start()
            time.sleep(1.0)  # B under load before A touches anything
            a2 = cluster.spawn("a", 2)
            marks = wait_for_log(a2, MIGRATING, MIGRATED)
            time.sleep(1.0)  # and a moment after
        finally:
            load.stop.set()
            resolver.stop.set()
            for thread in threads:
                thread.join(timeout=70)
        log = a2.log()
    finally:
        for handle in (a2, b, a):
            if handle is not None and handle.process.poll() is None:
                stop_owui(handle)

    window = (marks[MIGRATING], marks[MIGRATED])
    in_window = load.during(*window)
    report = (f"rolling upgrade: B answered {load.requests} requests ({in_window} in flight while A migrated, "
              f"{window[1] - window[0]:.1f} s), non-200 {len(load.non_200)}, ciphertext or placeholders "
              f"{len(load.ciphertext)}, wrong title {len(load.wrong)}, slowest {load.slowest_s * 1000:.0f} ms; "
              f"name resolution checked {resolver.checks} times, not the view {len(resolver.misses)}; "
              f"test {time.monotonic() - started:.0f} s")
    print("\n" + report)
    (Path(os.environ.get("TMPDIR", "/tmp")) / "owui-crypto-e2e-rolling.txt").write_text(report + "\n" + log,
                                                                                         encoding="utf-8")

    # A really upgraded, in one go, with the message view rebuilt inside Open WebUI's transaction.
    assert cluster.sql("SELECT version_num FROM alembic_version") == [(HEAD,)]
    assert "rebuilt the decrypting views of message in their transaction" in log, log[-4000:]
    assert cluster.sql("SELECT count(*) FROM pg_attribute WHERE attrelid = 'owui_crypto_view.message'::regclass "
                       "AND attname = 'app_id'") == [(1,)]
    assert cluster.sql("SELECT count(*) FROM owui_crypto.drift()") == [(0,)]
    # B answered throughout, and never anything but the owner's plaintext.
    assert in_window > 0, report
    assert load.non_200 == [], load.non_200[:5]
    assert load.ciphertext == [], load.ciphertext[:5]
    assert load.wrong == [], load.wrong[:5]
    assert resolver.checks > 0 and resolver.misses == [], resolver.misses[:5]
