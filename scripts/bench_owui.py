#!/usr/bin/env python3
"""make bench-owui: plain Open WebUI 0.12.4 against owui-crypto serve, side by side, in one run.

Starts, from the venv it runs in (.venv-owui), plain Open WebUI (`open-webui serve`) and `owui-crypto serve`
on two throw-away PostgreSQL databases of the same server (app_adapter.devdb), both on 127.0.0.1, offline, with
the e2e suite's stub model (e2e/llm_stub.py) as their one backend and moto as owui-crypto's KMS. Both get the
same users and chats through their own API (`POST /api/v1/chats/import`; owui-crypto seals every row as it
is written): users with 20, 200 and 1,000 chats (--quick: 20 and 200), a few other users, and a writer.
Chat sizes: log-normal around 4 KiB with a tail to 200 KiB (scripts/bench_owui_data.py).

It then sends the same request, with the same data, to one server and then the other, alternating which
goes first: GET a chat, the chat list as the web UI asks for it (`?page=1`) and unpaginated, search by a
title word and by a message word, an update appending a message, a new chat of 10 messages, and a completion
round trip with the stub model (POST, then until the reply is saved). Per request: wall-clock latency
(median, p95), and the CPU of that server's PostgreSQL backends and of its own process, read from /proc
before and after each request. Then GET chat throughput with 8 concurrent clients, one server at a time.

Writes DIR/bench-owui.md (the table), DIR/bench-owui.png (owui-crypto / plain per request and size),
DIR/bench-owui.json (every sample) and the two servers' logs to --out DIR, and ends with one line:

    RESULT get=<x> update=<x> list=<x> search1000=<x> new=<x> throughput=<x>

each owui-crypto / plain (medians; > 1 is slower), throughput as owui-crypto rps / plain rps (< 1 is a loss),
all at the largest user measured (1,000 chats; 200 with --quick). Every loop is bounded in count and time
(--max-minutes for the whole run); on exit, an error or Ctrl-C it stops both servers, drops both databases
and removes what else it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # e2e.llm_stub; app_adapter is installed (editable) in .venv-owui

import bench_owui_data as data  # noqa: E402  (scripts/, next to this file)
import bench_owui_report as report  # noqa: E402
from bench_owui_report import ENC, PLAIN, Cell, Throughput  # noqa: E402

from app_adapter import devdb  # noqa: E402
from app_adapter.devstack import kms_emulator  # noqa: E402
from e2e.llm_stub import MODEL, LlmStub  # noqa: E402

#: Open WebUI offline, as e2e/conftest.py starts it (OFFLINE_ENV): no model downloads, no version check,
#: no Ollama; the stub model is the one backend and every user may use it.
OFFLINE_ENV = {
    "OFFLINE_MODE": "true",
    "HF_HUB_OFFLINE": "1",
    "ENABLE_OLLAMA_API": "false",
    "RAG_EMBEDDING_ENGINE": "openai",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
    "ENABLE_VERSION_UPDATE_CHECK": "false",
    "ENABLE_API_KEYS": "true",
    "BYPASS_MODEL_ACCESS_CONTROL": "true",
    "GLOBAL_LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}
#: Settings that would make either server differ from the other or point elsewhere.
SCRUB = ("DATABASE_SCHEMA", "UVICORN_WORKERS", "ENABLE_DB_MIGRATIONS", "DATABASE_TYPE", "DATABASE_POOL_SIZE",
         "DATABASE_POOL_MAX_OVERFLOW", "REDIS_URL", "WEBUI_SECRET_KEY")
STARTUP_TIMEOUT = 300.0
REQUEST_TIMEOUT = 120.0
REPLY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Mode:
    sizes: tuple[int, ...]
    others: int  # other users
    other_chats: int  # chats each
    reps: int  # measured pairs per request and size, at most
    min_reps: int  # at least, whatever the time
    cell_seconds: float  # time budget per request and size, once min_reps are done
    warmup: int
    clients: int
    tput_seconds: float  # per window; two windows per server
    max_minutes: float


FULL = Mode(sizes=(20, 200, 1000), others=3, other_chats=100, reps=40, min_reps=8, cell_seconds=90, warmup=3,
            clients=8, tput_seconds=15, max_minutes=60)
QUICK = Mode(sizes=(20, 200), others=3, other_chats=20, reps=12, min_reps=4, cell_seconds=20, warmup=2,
             clients=8, tput_seconds=5, max_minutes=25)


# -- stopping -------------------------------------------------------------------------------------------------

class Stopped(KeyboardInterrupt):
    """A signal asked the run to stop; a KeyboardInterrupt, so every `with` on the stack unwinds."""


class OutOfTime(RuntimeError):
    """The run's time limit (--max-minutes) passed."""


class Deadline:
    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self.at = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise OutOfTime(f"the run's time limit ({self.minutes:g} min, --max-minutes) passed during {what}")


class _Signals:
    tearing_down = False
    stop = threading.Event()  # seen by the seeding threads


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    _Signals.stop.set()
    if _Signals.tearing_down:
        return  # a second Ctrl-C must not cut the clean-up short
    _Signals.tearing_down = True
    raise Stopped(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


class Teardown(contextlib.ExitStack):
    """An ExitStack that ignores further stop signals while it unwinds, so each clean-up step completes."""

    def __exit__(self, *exc: Any) -> bool:
        _Signals.tearing_down = True
        _Signals.stop.set()
        return super().__exit__(*exc)


def say(message: str) -> None:
    print(f"bench-owui: {message}", flush=True)


# -- the two servers ------------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str  # PLAIN or ENC
    command: list[str]
    database: str
    libpq_url: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    startup_s: float = math.nan
    clients: dict[str, httpx.Client] = field(default_factory=dict)  # user key -> client with its token

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=REQUEST_TIMEOUT)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise SystemExit(f"{self.name} exited ({self.process.returncode}); its log ends:\n{self.log_tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(server: Server, env: dict[str, str], cwd: Path) -> None:
    with server.log.open("wb") as sink:  # the child keeps its own descriptor
        server.started = time.monotonic()
        server.process = subprocess.Popen(server.command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)


def stop(server: Server) -> None:
    for client in server.clients.values():
        client.close()
    process = server.process
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_healthy(servers: list[Server], deadline: Deadline) -> None:
    waiting = list(servers)
    limit = time.monotonic() + STARTUP_TIMEOUT
    while waiting:
        for server in list(waiting):
            server.alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                    server.startup_s = time.monotonic() - server.started
                    say(f"{server.name} answers after {server.startup_s:.0f} s")
                    waiting.remove(server)
        if waiting and time.monotonic() > limit:
            raise SystemExit(f"{waiting[0].name} not healthy after {STARTUP_TIMEOUT:.0f} s; its log ends:\n"
                             f"{waiting[0].log_tail()}")
        deadline.check("start-up")
        if waiting:
            time.sleep(0.5)


# -- CPU from /proc -------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _task_ns(path: str) -> int | None:
    """CPU time of one task in ns: schedstat (ns resolution), else stat's utime + stime (clock ticks)."""
    try:
        with open(f"{path}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"{path}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def process_ns(pid: int) -> int | None:
    """CPU time of every thread of a process, in ns (threads that ended are not counted)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = [ns for t in tasks if (ns := _task_ns(f"/proc/{pid}/task/{t}")) is not None]
    return sum(total) if total else None


class CpuProbe:
    """CPU of one server's PostgreSQL backends (the client backends of its database, from pg_stat_activity)
    and of its own process, both from /proc. Works when PostgreSQL runs on this machine in this PID namespace;
    ``usable`` says whether it does."""

    def __init__(self, monitor: psycopg.Connection, database: str, pid: int) -> None:
        self.monitor, self.database, self.pid = monitor, database, pid

    @staticmethod
    def usable(monitor: psycopg.Connection) -> str | None:
        """None if backends are visible in /proc, else why not."""
        pid = monitor.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return f"PostgreSQL's backend pid {pid} is not a process here (a remote server or a container)"
        if b"postgres" not in cmdline:
            return f"pid {pid} here is not PostgreSQL's backend (another PID namespace)"
        return None

    def snapshot(self) -> tuple[dict[int, int], int]:
        pids = [r[0] for r in self.monitor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type IN ('client backend', "
            "'parallel worker')", (self.database,)).fetchall()]
        backends = {pid: ns for pid in pids if (ns := _task_ns(f"/proc/{pid}")) is not None}
        return backends, process_ns(self.pid) or 0

    @staticmethod
    def delta(before: tuple[dict[int, int], int], after: tuple[dict[int, int], int]) -> tuple[float, float]:
        """(PostgreSQL s, app s) between two snapshots. A backend that appeared counts whole; one that exited
        in between is lost (Open WebUI keeps its pool's connections, so that is rare)."""
        pg = sum(ns - before[0].get(pid, 0) for pid, ns in after[0].items())
        return pg / 1e9, (after[1] - before[1]) / 1e9


# -- seeding --------------------------------------------------------------------------------------------------

def ok(response: httpx.Response, what: str = "") -> httpx.Response:
    if response.status_code != 200:
        raise SystemExit(f"{what or response.request.method} {response.request.url.path}: {response.status_code} "
                         f"{response.text[:500]}")
    return response


def create_users(server: Server, users: list[data.User]) -> None:
    """admin signs up (Open WebUI's first user is its admin) and adds the others as users."""
    admin = users[0]
    with server.client() as anon:
        body = ok(anon.post("/api/v1/auths/signup", json={"name": admin.name, "email": admin.email,
                                                           "password": data.PASSWORD}), "sign-up").json()
    admin.tokens[server.name], admin.ids[server.name] = body["token"], body["id"]
    server.clients[admin.key] = server.client(body["token"])
    for user in users[1:]:
        body = ok(server.clients[admin.key].post("/api/v1/auths/add", json={
            "name": user.name, "email": user.email, "password": data.PASSWORD, "role": user.role}), "add user").json()
        token = body.get("token")
        if not token:
            with server.client() as anon:
                token = ok(anon.post("/api/v1/auths/signin", json={"email": user.email,
                                                                    "password": data.PASSWORD})).json()["token"]
        user.tokens[server.name], user.ids[server.name] = token, body["id"]
        server.clients[user.key] = server.client(token)


def seed(server: Server, users: list[data.User], deadline: Deadline) -> str:
    """Users and their chats through the server's own API; returns a summary line."""
    began = time.monotonic()
    create_users(server, users)
    users_s = time.monotonic() - began
    n = 0
    for user in users:
        for batch in data.import_batches(user.chats):
            if _Signals.stop.is_set():
                raise Stopped("stopping")
            deadline.check("seeding")
            server.alive()
            forms = [data.import_form(c) for c in batch]
            answer = ok(server.clients[user.key].post("/api/v1/chats/import", json={"chats": forms}),
                        f"{server.name}: import").json()
            if len(answer) != len(batch):
                raise SystemExit(f"{server.name}: imported {len(answer)} chats of {len(batch)}")
            for chat, row in zip(batch, answer, strict=True):
                chat.ids[server.name] = row["id"]
            n += len(batch)
    return (f"{server.name}: {len(users)} users in {users_s:.0f} s, {n} chats imported in "
            f"{time.monotonic() - began - users_s:.0f} s")


def vacuum_analyze(pg: devdb.Server, database: str) -> None:
    with pg.connect(database) as conn:
        conn.execute("VACUUM ANALYZE")


# -- requests -------------------------------------------------------------------------------------------------

Run = Callable[[Server, Any], tuple[float, httpx.Response]]


def timed_request(client: httpx.Client, method: str, path: str, body: Any = None) -> tuple[float, httpx.Response]:
    began = time.perf_counter()
    response = client.request(method, path, json=body)
    elapsed = time.perf_counter() - began
    return elapsed, ok(response)


def completion_round_trip(client: httpx.Client, text: str) -> tuple[float, httpx.Response]:
    """POST /api/chat/completions as the web client sends a first message (stream, session, ids), then GET
    the chat until the stub's reply is saved in it (Open WebUI saves it from a task the request spawned).
    No background tasks (title, tags, follow-ups) are asked for."""
    user_id, reply_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": text}], "parent_id": None,
            "id": reply_id, "session_id": "bench-owui",
            "user_message": {"id": user_id, "parentId": None, "childrenIds": [reply_id], "role": "user",
                             "content": text, "timestamp": int(time.time())}}
    began = time.perf_counter()
    response = ok(client.post("/api/chat/completions", json=body), "completion")
    chat_id = response.json()["chat_id"]
    limit = time.monotonic() + REPLY_TIMEOUT
    while time.monotonic() < limit:
        got = ok(client.get(f"/api/v1/chats/{chat_id}"))
        message = got.json()["chat"]["history"]["messages"].get(reply_id) or {}
        if message.get("done"):
            return time.perf_counter() - began, got
        time.sleep(0.01)
    raise SystemExit(f"the stub model's reply was not saved within {REPLY_TIMEOUT:.0f} s")


@dataclass
class Spec:
    """How to measure one cell: ``prepare(i)`` once per pair (the same payload for both servers), then
    ``run(server, payload)`` per server; ``check`` compares the two warm-up answers."""

    cell: Cell
    prepare: Callable[[int], Any]
    run: Run
    check: Callable[[dict[str, httpx.Response]], str | None] | None = None


def _same_length(responses: dict[str, httpx.Response]) -> str | None:
    a, b = (len(responses[s].json()) for s in (PLAIN, ENC))
    return None if a == b else f"plain returned {a} results, owui-crypto {b}"


def plan(users: dict[str, data.User], mode: Mode, seed: int) -> list[Spec]:
    """Every request and size, in the order measured: reads first (on the seeded data), then writes."""
    rng = random.Random(seed + 1)
    specs: list[Spec] = []
    sizes = [s for s in mode.sizes if f"u{s}" in users]
    largest = users[f"u{sizes[-1]}"]

    def get_of(user: data.User, pick: Callable[[int], data.Chat]) -> tuple[Callable[[int], Any], Run, Callable]:
        def run(srv: Server, chat: data.Chat) -> tuple[float, httpx.Response]:
            return timed_request(srv.clients[user.key], "GET", f"/api/v1/chats/{chat.ids[srv.name]}")

        def check(responses: dict[str, httpx.Response]) -> str | None:
            titles = {s: r.json().get("title") for s, r in responses.items()}
            return None if titles[PLAIN] == titles[ENC] else f"titles differ: {titles}"

        return pick, run, check

    def fixed(user: data.User, method: str, path: str) -> Run:
        return lambda srv, _payload: timed_request(srv.clients[user.key], method, path)

    for n in sizes:
        user = users[f"u{n}"]
        order = list(range(len(user.chats)))
        pick_rng = random.Random(seed + n)
        pick_rng.shuffle(order)
        prepare, run, check = get_of(user, lambda i, u=user, o=order: u.chats[o[i % len(o)]])
        specs.append(Spec(Cell("get", "GET /api/v1/chats/{id}", f"{n} chats"), prepare, run, check))
    # by the chat's own size, in the largest user's chats: the smallest, a median one, the largest
    by_size = sorted(largest.chats, key=lambda c: c.size())
    for chat in (by_size[0], by_size[len(by_size) // 2], by_size[-1]):
        prepare, run, check = get_of(largest, lambda i, c=chat: c)
        specs.append(Spec(Cell("get_size", "GET /api/v1/chats/{id}", f"one {chat.size() / 1024:.0f} KiB chat"),
                          prepare, run, check))
    for request, label, path in (
            ("list_page", "GET /api/v1/chats/list?page=1", "/api/v1/chats/list?page=1"),
            ("list_all", "GET /api/v1/chats/list (unpaginated)", "/api/v1/chats/list"),
            ("search_title", "GET /api/v1/chats/search?text= (title word)",
             f"/api/v1/chats/search?text={data.TITLE_WORD}"),
            ("search_text", "GET /api/v1/chats/search?text= (message word)",
             f"/api/v1/chats/search?text={data.TEXT_WORD}")):
        for n in sizes:
            user = users[f"u{n}"]

            def check_list(responses: dict[str, httpx.Response], u: data.User = user,
                           whole: bool = request == "list_all") -> str | None:
                problem = _same_length(responses)
                got = len(responses[ENC].json())
                if problem is None and whole and got != len(u.chats):
                    problem = f"listed {got} chats of {len(u.chats)}"
                return problem

            specs.append(Spec(Cell(request, label, f"{n} chats"), lambda i: None, fixed(user, "GET", path),
                              check_list))
    for n in sizes:
        user = users[f"u{n}"]
        chats_rng = random.Random(seed + 7 * n)

        def prepare_update(i: int, u: data.User = user, r: random.Random = chats_rng) -> Any:
            chat = r.choice(u.chats)
            return chat, data.follow_up(rng, chat)

        def run_update(srv: Server, payload: Any, u: data.User = user) -> tuple[float, httpx.Response]:
            chat, body = payload
            return timed_request(srv.clients[u.key], "POST", f"/api/v1/chats/{chat.ids[srv.name]}", body)

        specs.append(Spec(Cell("update", "POST /api/v1/chats/{id} (append a message)", f"{n} chats"),
                          prepare_update, run_update))
    writer = users["writer"]
    specs.append(Spec(Cell("new", "POST /api/v1/chats/new", "10 messages"),
                      lambda i: data.ten_message_chat(rng, f"bench new {i}"),
                      lambda srv, body: timed_request(srv.clients[writer.key], "POST", "/api/v1/chats/new", body)))
    specs.append(Spec(Cell("completion", "POST /api/chat/completions + reply saved", "new chat, stub model"),
                      lambda i: f"Benchmark question {i}: {data.prose(rng, 120)}",
                      lambda srv, text: completion_round_trip(srv.clients[writer.key], text)))
    return specs


def measure(spec: Spec, servers: dict[str, Server], probes: dict[str, CpuProbe] | None, mode: Mode,
            deadline: Deadline) -> None:
    cell = spec.cell
    warm: dict[str, httpx.Response] = {}
    for i in range(mode.warmup):
        payload = spec.prepare(-1 - i)
        for name in (PLAIN, ENC):
            warm[name] = spec.run(servers[name], payload)[1]
    if spec.check is not None:
        problem = spec.check(warm)
        if problem:
            cell.note = problem
            say(f"  warning: {cell.label} · {cell.size}: {problem}")
    began = time.monotonic()
    for i in range(mode.reps):
        if i >= mode.min_reps and time.monotonic() - began > mode.cell_seconds:
            cell.note = (cell.note + "; " if cell.note else "") + f"time budget: {i} of {mode.reps} pairs"
            break
        deadline.check(f"{cell.label} · {cell.size}")
        payload = spec.prepare(i)
        for name in ((PLAIN, ENC) if i % 2 == 0 else (ENC, PLAIN)):
            server = servers[name]
            server.alive()
            before = probes[name].snapshot() if probes else None
            elapsed, _ = spec.run(server, payload)
            if probes and before is not None:
                pg, app = CpuProbe.delta(before, probes[name].snapshot())
                cell.pg_cpu[name].append(pg)
                cell.app_cpu[name].append(app)
            cell.latency[name].append(elapsed)
    say(f"  {cell.label} · {cell.size}: plain {1000 * cell.median(PLAIN):.1f} ms, owui-crypto "
        f"{1000 * cell.median(ENC):.1f} ms (medians of {cell.n}), ratio {cell.ratio():.2f}")


# -- throughput -----------------------------------------------------------------------------------------------

async def _load(base_url: str, token: str, chat_ids: list[str], clients: int, seconds: float) -> tuple[int, int, float]:
    """``clients`` workers GET chats in turn for ``seconds``; returns (answered 200, errors, elapsed s)."""
    done = errors = 0
    position = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=REQUEST_TIMEOUT) as client:
        loop = asyncio.get_running_loop()
        began = loop.time()
        stop_at = began + seconds

        async def worker() -> None:
            nonlocal done, errors, position
            while loop.time() < stop_at and not _Signals.stop.is_set():
                chat_id = chat_ids[position % len(chat_ids)]
                position += 1
                try:
                    response = await client.get(f"/api/v1/chats/{chat_id}")
                    if response.status_code == 200:
                        done += 1
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        return done, errors, loop.time() - began


def py_spy(server: Server, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of the server's process for one window (collapsed stacks in ``out``), if installed."""
    binary = Path(sys.executable).parent / "py-spy"
    if not binary.exists() or server.process is None:
        say("--profile: no py-spy in this venv (pip install py-spy): not profiling")
        return None
    return subprocess.Popen([str(binary), "record", "--pid", str(server.process.pid), "--duration",
                             str(max(1, int(seconds))), "--rate", "200", "--format", "raw", "--nonblocking",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def throughput(servers: dict[str, Server], user: data.User, probes: dict[str, CpuProbe] | None, mode: Mode,
               seed: int, deadline: Deadline, profile: Path | None = None) -> Throughput:
    """GET chat with ``mode.clients`` concurrent clients, one server at a time: plain, owui-crypto, owui-crypto,
    plain (a short warm-up window first), each window ``mode.tput_seconds``; the same chats in the same order.
    With ``profile``, each window is also recorded by py-spy into that directory."""
    result = Throughput(mode.clients)
    rng = random.Random(seed + 99)
    order = [rng.randrange(len(user.chats)) for _ in range(20000)]
    ids = {name: [user.chats[k].ids[name] for k in order] for name in (PLAIN, ENC)}
    for name in (PLAIN, ENC):  # warm-up
        asyncio.run(_load(servers[name].base_url, user.tokens[name], ids[name], mode.clients, 2))
    for window, name in enumerate((PLAIN, ENC, ENC, PLAIN)):
        deadline.check("throughput")
        servers[name].alive()
        before = probes[name].snapshot() if probes else None
        spy = None
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = py_spy(servers[name], mode.tput_seconds, profile / f"py-spy-{window}-{name}.txt")
        done, errors, elapsed = asyncio.run(_load(servers[name].base_url, user.tokens[name], ids[name],
                                                  mode.clients, mode.tput_seconds))
        if spy is not None:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if probes and before is not None:
            pg, app = CpuProbe.delta(before, probes[name].snapshot())
            result.pg_cpu[name] += pg
            result.app_cpu[name] += app
        result.done[name] += done
        result.errors[name] += errors
        result.seconds[name] += elapsed
        say(f"  throughput window, {name}: {done / elapsed:.1f} requests/s ({errors} errors)")
    return result


# -- the run --------------------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Outcome:
    cells: list[Cell] = field(default_factory=list)
    tput: Throughput | None = None
    header: list[str] = field(default_factory=list)
    cpu_measured: bool = False
    cpu_note: str = ""
    stopped_early: str = ""
    largest: int = 0


def run(args: argparse.Namespace, mode: Mode, outcome: Outcome, removed: list[str]) -> None:
    deadline = Deadline(args.max_minutes or mode.max_minutes)
    load_before = os.getloadavg()
    users = data.make_users(args.seed, list(mode.sizes), mode.others, mode.other_chats)
    by_key = {u.key: u for u in users}
    seeded = [f"{u.key}: {data.size_summary(u.chats)}" for u in users if u.chats]  # before updates grow them
    for line in seeded:
        say(f"data: {line}")
    venv_bin = Path(sys.executable).parent
    with Teardown() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="bench-owui-"))
        stack.callback(removed.append, str(workdir))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        pg = devdb.find_server()
        if pg.keepalive is not None:
            stack.callback(pg.keepalive.stop)
        say(f"PostgreSQL: {pg.origin}")
        stack.enter_context(kms_emulator())
        stack.callback(removed.append, "moto")
        llm = stack.enter_context(LlmStub())
        stack.callback(removed.append, "the stub model")
        servers: dict[str, Server] = {}
        for name, cli, prefix in ((PLAIN, "open-webui", "bench_owui_plain"),
                                  (ENC, "owui-crypto", "bench_owui_crypto")):
            database = stack.enter_context(pg.scratch_database(prefix))
            stack.callback(removed.append, f"database {database}")
            port = free_port()
            (workdir / name).mkdir()
            servers[name] = Server(name, [str(venv_bin / cli), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                   database, pg.url(database), port, workdir / name / "serve.log")
        monitor = stack.enter_context(pg.connect())
        base_env = {k: v for k, v in os.environ.items() if k not in SCRUB}
        for server in servers.values():
            env = {**base_env, **OFFLINE_ENV,
                   # the same driver for both (psycopg 3); serve would normalise postgresql:// to it anyway
                   "DATABASE_URL": server.libpq_url.replace("postgresql://", "postgresql+psycopg://", 1),
                   "WEBUI_SECRET_KEY": os.urandom(24).hex(), "DATA_DIR": str(workdir / server.name / "data"),
                   "ENABLE_OPENAI_API": "true", "OPENAI_API_BASE_URLS": llm.base_url,
                   "OPENAI_API_KEYS": "bench-stub"}
            start(server, env, workdir / server.name)
            # unwound in reverse: stopped, then its log kept, then named as removed
            stack.callback(removed.append, f"{server.name} (pid {server.process.pid if server.process else '?'})")
            stack.callback(_keep_log, server, args.out)
            stack.callback(stop, server)
        say(f"starting plain Open WebUI (open-webui serve) and owui-crypto serve side by side "
            f"(about 30-60 s; logs in {args.out}/) ...")
        wait_healthy(list(servers.values()), deadline)

        say("seeding both through their own API (sign-up, POST /api/v1/auths/add, POST /api/v1/chats/import) ...")
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="seed")
        stack.callback(pool.shutdown, wait=False, cancel_futures=True)
        futures = [pool.submit(seed, server, users, deadline) for server in servers.values()]
        for future in futures:
            say(future.result())
        for server in servers.values():
            vacuum_analyze(pg, server.database)
        sizes_mb = {s.name: monitor.execute("SELECT pg_database_size(%s)", (s.database,)).fetchone()[0] / 1e6
                    for s in servers.values()}

        why_not = CpuProbe.usable(monitor)
        probes = None
        if why_not is None:
            probes = {name: CpuProbe(monitor, s.database, s.process.pid)  # type: ignore[union-attr]
                      for name, s in servers.items()}
        outcome.cpu_measured, outcome.cpu_note = probes is not None, why_not or ""
        if why_not:
            say(f"CPU per request not measured: {why_not}")

        say("measuring: the same request to each server in turn, alternating which goes first")
        specs = plan(by_key, mode, args.seed)
        outcome.largest = mode.sizes[-1]
        try:
            for spec in specs:
                if spec.cell.request == "update" and outcome.tput is None:  # reads done: throughput before writes
                    outcome.tput = throughput(servers, by_key[f"u{outcome.largest}"], probes, mode, args.seed,
                                              deadline, args.profile)
                measure(spec, servers, probes, mode, deadline)
                outcome.cells.append(spec.cell)
        except OutOfTime as exc:
            outcome.stopped_early = str(exc)
            say(f"stopping early: {exc}")
        rss = {name: rss_mb(s.process.pid) for name, s in servers.items()}  # type: ignore[union-attr]
        load_after = os.getloadavg()
        outcome.header = [
            f"# make bench-owui{' --quick' if args.quick else ''}: plain Open WebUI 0.12.4 against owui-crypto serve",
            "",
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, load average "
            f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end; PostgreSQL "
            f"{monitor.execute('SHOW server_version').fetchone()[0]} ({pg.origin}), "  # type: ignore[index]
            "both databases on the same server, both Open WebUIs on 127.0.0.1 with psycopg 3.",
            "",
            "Data (the same for both, through each server's own API): "
            + "; ".join(seeded)
            + f". Database size after VACUUM ANALYZE: plain {sizes_mb[PLAIN]:.0f} MB, owui-crypto "
              f"{sizes_mb[ENC]:.0f} MB.",
            "",
            f"Start-up (both at once, spawn to /health 200): plain {servers[PLAIN].startup_s:.0f} s, owui-crypto "
            f"{servers[ENC].startup_s:.0f} s. Resident memory at the end: plain {rss[PLAIN]:.0f} MB, owui-crypto "
            f"{rss[ENC]:.0f} MB.",
            "",
            "Latency is wall-clock at the client, per request, pairs interleaved (the same request to each server, "
            "alternating which goes first); ratio = owui-crypto / plain (> 1: slower). CPU per request: the "
            "server's PostgreSQL backends and its own process, from /proc before and after each request."
            + (f" Not measured: {outcome.cpu_note}." if outcome.cpu_note else ""),
        ]
        if outcome.stopped_early:
            outcome.header += ["", f"**Stopped early**: {outcome.stopped_early}."]


def _keep_log(server: Server, out: Path) -> None:
    with contextlib.suppress(OSError):
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(server.log, out / f"bench-owui-{server.name}.log")


def result_line(outcome: Outcome) -> str:
    def ratio(request: str) -> float:
        for cell in outcome.cells:
            if cell.request == request and cell.size == f"{outcome.largest} chats":
                return cell.ratio()
        for cell in outcome.cells:
            if cell.request == request and not cell.size.endswith("chats"):
                return cell.ratio()
        return math.nan

    tput = outcome.tput.ratio() if outcome.tput else math.nan
    values = {"get": ratio("get"), "update": ratio("update"), "list": ratio("list_page"),
              "search1000": ratio("search_text"), "new": ratio("new"), "throughput": tput}
    return "RESULT " + " ".join(f"{k}={v:.2f}" for k, v in values.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="users with 20 and 200 chats only, fewer requests "
                                                             "(a smoke run of a few minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results",
                        help="directory for the table, the PNG, the samples and the logs (default: bench-results/)")
    parser.add_argument("--seed", type=int, default=20240612, help="seed of the data and of the request order")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="time limit of the whole run (default: 60, --quick 25); what is measured by then is "
                             "reported")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="record each throughput window with py-spy (in this venv) into DIR, as collapsed stacks")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    install_signal_handlers()
    began = time.monotonic()
    removed: list[str] = []
    outcome = Outcome()
    try:
        run(args, mode, outcome, removed)
    except (Stopped, OutOfTime) as stopped:
        print(f"\nbench-owui: stopped ({stopped})")
        if removed:
            print(f"bench-owui: stopped and removed: {', '.join(removed)}")
        return 130 if isinstance(stopped, Stopped) else 1
    if removed:
        say(f"stopped and removed: {', '.join(removed)}")
    args.out.mkdir(parents=True, exist_ok=True)
    table = report.markdown(outcome.cells, outcome.tput, outcome.cpu_measured, outcome.header)
    (args.out / "bench-owui.md").write_text(table, encoding="utf-8")
    (args.out / "bench-owui.json").write_text(json.dumps(
        {"mode": "quick" if args.quick else "full", "seed": args.seed, "header": outcome.header,
         "cells": [c.as_dict() for c in outcome.cells],
         "throughput": outcome.tput.__dict__ if outcome.tput else None}, indent=1), encoding="utf-8")
    png = args.out / "bench-owui.png"
    why = report.plot(outcome.cells, outcome.tput, png,
                      f"owui-crypto / plain Open WebUI 0.12.4{' (--quick)' if args.quick else ''}: median (bars) "
                      f"and p95 (ticks), {os.cpu_count()} CPUs")
    print()
    print(table)
    say(f"wrote {args.out / 'bench-owui.md'}, {args.out / 'bench-owui.json'}"
        + (f", {png}" if why is None else f"; no PNG: {why}") + f"; run took {time.monotonic() - began:.0f} s")
    if args.quick:
        say(f"--quick: RESULT is at {outcome.largest} chats (search1000 too), not 1,000")
    print(result_line(outcome), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
