"""`make soak`: a bounded load-and-fault run of the real Open WebUI behind two `owui-crypto serve` instances.

The stack (scripts/soak_stack.py): a private PostgreSQL 15 cluster, PgBouncer in transaction pooling, a private
Redis (WEBSOCKET_MANAGER=redis), moto's KMS behind a fault proxy, the stub model, two serve instances. Simulated
users (scripts/soak_load.py) work through the API, some of them (scripts/soak_socket.py) with a socket.io
connection as the web client keeps one, while faults run on a schedule: KMS unreachable for 30 s, KMS
throttling, a PostgreSQL fast restart, a PgBouncer restart, pg_terminate_backend of busy backends, one serve
SIGKILLed and restarted, a user deleted by the admin while active, and hostile inputs (scripts/soak_hostile.py).
The invariants (scripts/soak_checks.py) are checked during the run and after it. Output in --out: events.jsonl,
faults.json, report.md, the timeline PNG, the serve, PostgreSQL and PgBouncer logs. The last line printed is
`SOAK PASSED ...` or `SOAK FAILED: <reasons>`, and the exit code says the same (0 / 1).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts import soak_checks, soak_load, soak_socket  # noqa: E402
from scripts.soak_stack import APP_ROLE, Stack, running_stack  # noqa: E402

GRACE_S = 30.0  # after a fault's end, its errors may go on this long (the report's `recovered_after_s`)
KMS_DOWN_S = 30.0
PROBE_EVERY_S = 5.0


@dataclass
class Settings:
    minutes: float
    users: int
    seed: int
    out: Path
    think_s: tuple[float, float]
    key_ttl: int
    cycles: int
    socket_share: float = 0.5


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="soak.py", description=__doc__.split("\n\n")[0] if __doc__ else "",
        epilog="Examples: `make soak SOAK_ARGS=--ci` (a few minutes), `make soak SOAK_ARGS=\"--minutes 15\"`.")
    parser.add_argument("--ci", action="store_true",
                        help="CI settings: 10 users, 4 minutes of load, one pass of every fault (about 5 minutes "
                             "wall time on 2 cores)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="minutes of load (default 15; 4 with --ci); one pass of the faults per 4 minutes")
    parser.add_argument("--users", type=int, default=None,
                        help="simulated users, besides the admin and the hostile user (default 50; 10 with --ci)")
    parser.add_argument("--out", type=Path, default=REPO / "soak-results", help="output directory "
                        "(default soak-results/; emptied first)")
    parser.add_argument("--socket-share", type=float, default=0.5,
                        help="share of the users that keep a socket.io connection as the web client does and wait "
                             "for their replies on it (default 0.5; 0 = HTTP polling only)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the users' choices (default: random, "
                        "printed)")
    args = parser.parse_args(argv)
    minutes = args.minutes if args.minutes is not None else (4.0 if args.ci else 15.0)
    users = args.users if args.users is not None else (10 if args.ci else 50)
    if minutes < 2 or users < 3:
        parser.error("at least 2 minutes (the faults need them) and 3 users")
    if not 0.0 <= args.socket_share <= 1.0:
        parser.error("--socket-share is a share of the users, from 0 to 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    think = (0.5, 2.0) if users <= 20 else (1.0, 4.0)
    return Settings(minutes, users, seed, args.out, think, key_ttl=10, cycles=max(1, int(minutes * 60 // 240)),
                    socket_share=args.socket_share)


def say(message: str) -> None:
    print(message, flush=True)


# -- the run ------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    settings: Settings
    stack: Stack
    events: soak_load.EventLog
    violations: soak_load.Violations = field(default_factory=soak_load.Violations)
    faults: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    hostile_done: threading.Event = field(default_factory=threading.Event)
    users: dict[str, soak_load.UserLedger] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    hostile: list[Any] = field(default_factory=list)
    hostile_problems: list[str] = field(default_factory=list)
    probe: soak_checks.PoolProbe | None = None
    keys: dict[str, bytes] = field(default_factory=dict)
    share_key: bytes | None = None
    socket_users: set[str] = field(default_factory=set)
    links: list[soak_socket.SocketLink] = field(default_factory=list)

    @property
    def endpoints(self) -> dict[str, str]:
        return {name: serve.base_url for name, serve in self.stack.serves.items()}

    def api(self, label: str, token: str, seed: int, marker: str | None = None, **kw: Any) -> soak_load.Api:
        return soak_load.Api(label, token, self.endpoints, self.events, self.violations, random.Random(seed),
                             marker, **kw)

    def fault(self, name: str, detail: str, action: Callable[[], None]) -> None:
        start = self.events.now()
        say(f"  fault {name} at {start:.0f} s: {detail}")
        try:
            action()
        except Exception as exc:  # the fault itself failed: that is a failure of the run, said plainly
            self.violations.add(f"fault {name} could not be applied: {type(exc).__name__}: {str(exc)[:200]}")
        end = self.events.now()
        self.faults.append({"name": name, "start": round(start, 3), "end": round(end, 3), "detail": detail})
        say(f"  fault {name} over at {end:.0f} s")


def setup_users(run: Run) -> None:
    """The admin signs up first (Open WebUI makes them admin), then adds every user; each signs in."""
    a = run.endpoints["a"]
    with httpx.Client(base_url=a, timeout=120) as anon:
        body = anon.post("/api/v1/auths/signup", json={"name": "Soak Admin", "email": "admin@soak.example",
                                                       "password": soak_load.PASSWORD}).raise_for_status().json()
    run.tokens["admin"], run.ids["admin"] = body["token"], body["id"]
    labels = [f"u{i:02d}" for i in range(run.settings.users)] + ["hostile"]

    def add(index: int, label: str) -> None:
        base = list(run.endpoints.values())[index % 2]
        with httpx.Client(base_url=base, timeout=120,
                          headers={"Authorization": f"Bearer {run.tokens['admin']}"}) as admin:
            email = f"{label}@soak.example"
            for attempt in range(3):
                response = admin.post("/api/v1/auths/add", json={"name": f"Soak {label}", "email": email,
                                                                 "password": soak_load.PASSWORD, "role": "user"})
                if response.is_success or attempt == 2:
                    response.raise_for_status()
                    break
                time.sleep(2)
            signed = admin.post("/api/v1/auths/signin", json={"email": email, "password": soak_load.PASSWORD},
                                headers={"Authorization": ""}).raise_for_status().json()
        run.tokens[label], run.ids[label] = signed["token"], signed["id"]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda pair: add(*pair), enumerate(labels)))
    for i in range(run.settings.users):
        label = f"u{i:02d}"
        run.users[label] = soak_load.UserLedger(label, run.ids[label], soak_load.marker_for(i))
    run.socket_users = soak_socket.socket_users(list(run.users), run.settings.socket_share, run.settings.seed)


def schedule(run: Run) -> list[tuple[float, str, Callable[[], None]]]:
    """(offset in seconds from the load's start, name, action): every fault once per cycle, spread out."""
    total = run.settings.minutes * 60
    cycle = total / run.settings.cycles
    stack = run.stack
    plan: list[tuple[float, str, Callable[[], None]]] = []
    victims = [label for label in sorted(run.users, reverse=True)]
    for n in range(run.settings.cycles):
        base = n * cycle
        victim = victims[n]
        plan += [
            (base + 0.27 * cycle, "kms_down", lambda: kms_mode(run, "down", KMS_DOWN_S, "unreachable")),
            (base + 0.47 * cycle, "kms_throttle", lambda: kms_mode(run, "throttle", min(20.0, 0.08 * cycle),
                                                                   "throttled")),
            (base + 0.57 * cycle, "terminate_backends", lambda: terminate_busy(run)),
            (base + 0.62 * cycle, "pg_restart", lambda: run.fault("pg_restart", "pg_ctl restart -m fast",
                                                                  stack.pg.restart)),
            (base + 0.68 * cycle, "pgbouncer_restart",
             lambda: run.fault("pgbouncer_restart", "PgBouncer stopped and started on the same port",
                               stack.bouncer.restart)),
            (base + 0.72 * cycle, "user_delete", lambda v=victim: delete_user(run, v)),
            (base + 0.75 * cycle, "serve_kill", lambda k="b" if n % 2 == 0 else "a": kill_serve(run, k)),
        ]
    return sorted(plan, key=lambda p: p[0])


def kms_mode(run: Run, mode: str, seconds: float, word: str) -> None:
    def hold() -> None:
        run.stack.kms.mode = mode
        try:
            run.stop.wait(seconds)
        finally:
            run.stack.kms.mode = "pass"

    name = "kms_down" if mode == "down" else "kms_throttle"
    detail = ("KMS proxy drops every connection" if mode == "down" else
              "KMS proxy answers 400 ThrottlingException") + f" for {seconds:.0f} s ({word})"
    run.fault(name, detail, hold)


def terminate_busy(run: Run) -> None:
    """pg_terminate_backend of the app's backends that are running a statement or inside a transaction."""
    killed: list[int] = []

    def act() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(killed) < 3:
            rows = run.stack.pg.sql(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s"
                " AND state IN ('active', 'idle in transaction') AND pid <> pg_backend_pid()", (APP_ROLE,))
            killed.extend(pid for pid, ok in rows if ok)
            time.sleep(0.1)

    run.fault("terminate_backends", "pg_terminate_backend of busy backends of the app role", act)
    run.faults[-1]["detail"] += f" ({len(killed)} terminated)"


def delete_user(run: Run, label: str) -> None:
    ledger = run.users[label]

    def act() -> None:
        ledger.deleted = True  # its thread stops at its next step; its rows must all go
        with httpx.Client(base_url=run.endpoints["a"], timeout=60,
                          headers={"Authorization": f"Bearer {run.tokens['admin']}"}) as admin:
            for attempt in range(5):
                response = admin.delete(f"/api/v1/users/{ledger.user_id}")
                if response.is_success:
                    return
                time.sleep(2 + attempt)
            raise RuntimeError(f"DELETE /api/v1/users/{{id}} answered {response.status_code}")

    run.fault("user_delete", f"the admin deletes {label} while {label} is active", act)


def kill_serve(run: Run, name: str) -> None:
    serve = run.stack.serves[name]

    def act() -> None:
        serve.kill()
        serve.spawn(ENABLE_DB_MIGRATIONS="false")
        serve.wait_healthy(400)

    run.fault("serve_kill", f"serve {name} SIGKILLed, restarted; end = /health 200 again", act)


def faults_thread(run: Run) -> None:
    """Hostile inputs are judged on a healthy stack: the faults wait for them, up to 40% of the first cycle, and
    the whole schedule shifts by the wait."""
    cycle = run.settings.minutes * 60 / run.settings.cycles
    plan = schedule(run)
    run.hostile_done.wait(max(0.0, 0.40 * cycle - run.events.now()))
    shift = max(0.0, run.events.now() - plan[0][0])
    for offset, _, action in plan:
        if run.stop.wait(max(0.0, offset + shift - run.events.now())):
            return
        action()


def hostile_thread(run: Run, at: float) -> None:
    try:
        hostile(run, at)
    finally:
        run.hostile_done.set()


def hostile(run: Run, at: float) -> None:
    if run.stop.wait(max(0.0, at - run.events.now())):
        return
    try:
        from scripts.soak_hostile import run_hostile  # EXTRAS' module
    except ImportError as exc:
        say(f"  WARNING: hostile window skipped: scripts/soak_hostile.py not importable ({exc})")
        return
    outcomes: list[Any] = []

    def act() -> None:
        outcomes.extend(run_hostile(run.endpoints["a"], run.tokens["hostile"]))

    run.fault("hostile", "hostile inputs from one thread, as user hostile", act)
    run.hostile = outcomes
    for o in outcomes:
        if not getattr(o, "accepted", False) or getattr(o, "stored_half", True):
            run.hostile_problems.append(f"hostile case {o.case}: status {o.status}, accepted={o.accepted}, "
                                        f"stored_half={o.stored_half} ({o.detail})")


def probe_thread(run: Run) -> None:
    run.probe = soak_checks.PoolProbe(run.stack.app_url_pooled)
    while not run.stop.wait(PROBE_EVERY_S):
        for problem in run.probe.run(connections=2, transactions=5):
            run.violations.add(problem)


def user_thread(run: Run, label: str, seed: int, deadline: float) -> None:
    ledger = run.users[label]
    api = run.api(label, run.tokens[label], seed, ledger.marker)
    link: soak_socket.SocketLink | None = None
    try:
        sim: soak_load.UserSim
        if label in run.socket_users:
            link = soak_socket.SocketLink(label, run.tokens[label], run.endpoints, ledger.marker, run.violations,
                                          random.Random(seed + 7), run.events)
            run.links.append(link)
            sim = soak_socket.SocketUserSim(ledger, api, random.Random(seed), run.violations, run.settings.think_s,
                                            link=link)
        else:
            sim = soak_load.UserSim(ledger, api, random.Random(seed), run.violations, run.settings.think_s)
        sim.run(deadline, run.stop, max_iterations=100_000)
    finally:
        if link is not None:
            link.close()
        api.close()


def socket_problems(run: Run) -> list[str]:
    """The socket.io users must have had their replies by the done event, also across instances (Redis)."""
    if not run.links:
        return []
    total = soak_socket.summary(run.links)
    problems = []
    if total["done"] == 0:
        problems.append(f"no socket.io user got a single reply by its done event ({total['lost']} lost)")
    if total["asked_across"] >= 5 and total["done_across"] == 0:
        problems.append(f"none of {total['asked_across']} completions POSTed to the other instance than the "
                        "socket's got its done event: events do not cross instances through Redis")
    return problems


def load(run: Run) -> None:
    total = run.settings.minutes * 60
    deadline = time.monotonic() + total
    threads = [threading.Thread(target=user_thread, args=(run, label, run.settings.seed + i, deadline),
                                name=f"user-{label}", daemon=True) for i, label in enumerate(sorted(run.users))]
    threads += [threading.Thread(target=faults_thread, args=(run,), name="faults", daemon=True),
                threading.Thread(target=hostile_thread, args=(run, 3.0), name="hostile", daemon=True),
                threading.Thread(target=probe_thread, args=(run,), name="probe", daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads[:-3]:
        thread.join(timeout=total + 120)
    threads[-3].join(timeout=600)  # the schedule's last fault (a serve restart) ends by itself
    threads[-2].join(timeout=600)
    run.stop.set()
    threads[-1].join(timeout=60)


def final_checks(run: Run) -> list[str]:
    """After the load: everything healthy again, then every invariant."""
    problems: list[str] = []
    stack = run.stack
    stack.kms.mode = "pass"
    for serve in stack.serves.values():
        serve.wait_healthy(300)
    say("checks: reading every acknowledged write back as its owner")
    deleted = {label: u.user_id for label, u in run.users.items() if u.deleted}
    alive = {label: u.user_id for label, u in run.users.items() if not u.deleted}
    for label in sorted(alive):
        ledger = run.users[label]
        api = run.api(label, run.tokens[label], 0, ledger.marker)
        try:
            problems += soak_checks.read_back(ledger, api)
        finally:
            api.close()
    say("checks: fresh transactions through PgBouncer hold no key")
    probe = run.probe or soak_checks.PoolProbe(stack.app_url_pooled)
    problems += probe.run(connections=8, transactions=10)
    say("checks: deleted users' rows are gone, nobody else's")
    problems += soak_checks.deleted_user_gone(stack.superuser_url, deleted, alive)
    say("checks: every sealed value opens once in Python with its owner's key, and is not sealed twice")
    by_uid = {run.ids[label]: key for label, key in run.keys.items() if label not in deleted}
    sealed_problems, opened = soak_checks.sealed_once(stack.superuser_url, by_uid, run.share_key,
                                                      frozenset(deleted.values()))
    problems += sealed_problems
    say(f"checks: {opened} sealed values opened")
    dump = run.settings.out / "pg_dump.sql"
    stack.pg.dump(dump)
    markers = {label: u.marker for label, u in run.users.items()}
    keys = dict(run.keys)
    if run.share_key is not None:
        keys["share key"] = run.share_key
    say("checks: pg_dump and the PostgreSQL log hold no marker and no key")
    problems += soak_checks.scan_files([dump, stack.pg.log_path], markers, keys)
    dump.unlink()  # it held only ciphertext, but it is large and nobody needs it afterwards
    return problems


def collect_logs(stack: Stack, out: Path) -> None:
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for serve in stack.serves.values():
        for path in (stack.root / serve.name).glob("serve-*.log"):
            shutil.copy(path, logs / path.name)
    shutil.copy(stack.pg.log_path, logs / "postgresql.log")
    if stack.bouncer.log_path.exists():
        shutil.copy(stack.bouncer.log_path, logs / "pgbouncer.log")


def report(out: Path) -> tuple[str, list[dict[str, Any]]]:
    """EXTRAS' report (scripts/soak_report.py) if it is there; else a minimal one computed here."""
    try:
        from scripts.soak_report import write_report
    except ImportError:
        return fallback_report(out)
    result = write_report(out / "events.jsonl", out / "faults.json", out, grace_s=GRACE_S)
    (out / "report.md").write_text(result.markdown)
    return result.markdown, list(result.unexplained)


def fallback_report(out: Path) -> tuple[str, list[dict[str, Any]]]:
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line]
    faults = json.loads((out / "faults.json").read_text())
    windows = [(f["start"], f["end"] + GRACE_S) for f in faults]
    bad = [e for e in events if e["status"] == 0 or e["status"] >= 500]
    unexplained = [e for e in bad if not any(s <= e["t"] <= end for s, end in windows)]
    lines = ["| fault | start | end | requests | 5xx | no answer |", "| --- | --- | --- | --- | --- | --- |"]
    for f in faults:
        inside = [e for e in events if f["start"] <= e["t"] <= f["end"]]
        lines.append(f"| {f['name']} | {f['start']:.0f} | {f['end']:.0f} | {len(inside)} | "
                     f"{sum(e['status'] >= 500 for e in inside)} | {sum(e['status'] == 0 for e in inside)} |")
    lines.append(f"\n{len(events)} requests, {len(bad)} 5xx or no answer, {len(unexplained)} unexplained "
                 "(scripts/soak_report.py not available: fallback table)")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text, unexplained


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    started = time.monotonic()
    out = settings.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    say(f"soak: {settings.users} users, {settings.minutes:g} min of load, {settings.cycles} fault cycle(s), "
        f"seed {settings.seed}, output {out}")
    failures: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="owui-crypto-soak-"))
    summary = ""
    try:
        with running_stack(root, key_ttl=settings.key_ttl, log=say) as stack:
            events = soak_load.EventLog(out / "events.jsonl")
            run = Run(settings, stack, events)
            try:
                setup_users(run)
                run.keys, run.share_key = soak_checks.user_keys(stack.superuser_url, dict(run.ids))
                say(f"load: {len(run.users)} users + admin + hostile, until {settings.minutes:g} min; "
                    f"stack up after {time.monotonic() - started:.0f} s")
                events.t0 = time.monotonic()
                load(run)
                say(f"load done: {events.count} requests")
                (out / "faults.json").write_text(json.dumps(run.faults, indent=1) + "\n")
                failures += [f"during the run: {v}" for v in run.violations.items]
                failures += socket_problems(run)
                failures += run.hostile_problems
                failures += final_checks(run)
            finally:
                run.stop.set()
                events.close()
                collect_logs(stack, out)
                if not (out / "faults.json").exists():
                    (out / "faults.json").write_text(json.dumps(run.faults, indent=1) + "\n")
            markdown, unexplained = report(out)
            say(markdown)
            if unexplained:
                failures.append(f"{len(unexplained)} 5xx/no-answer outside every fault window + {GRACE_S:.0f} s, "
                                f"first: {json.dumps(unexplained[0])}")
            acked = sum(u.writes_acked for u in run.users.values())
            unsure = sum(u.writes_uncertain for u in run.users.values())
            probes = run.probe.checks if run.probe else 0
            summary = (f"{events.count} requests, {acked} acknowledged writes read back ({unsure} uncertain), "
                       f"{len(run.faults)} fault windows, {probes} pooled-transaction probes")
            if run.links:
                s = soak_socket.summary(run.links)
                summary += (f"; socket.io: {s['users']} users, {s['done']} replies by done event "
                            f"({s['done_across']} of {s['asked_across']} POSTed to the other instance), "
                            f"{s['lost']} lost, {s['events']} events scanned, {s['connects']} sockets, "
                            f"{s['reconnects']} reconnections")
    except KeyboardInterrupt:
        failures.append("interrupted (Ctrl-C); everything started was stopped")
    except Exception as exc:
        failures.append(f"the run broke: {type(exc).__name__}: {str(exc)[:600]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - started
    if failures:
        (out / "failures.txt").write_text("\n".join(failures) + "\n")
        for line in failures[:30]:
            say(f"  - {line}")
        say(f"SOAK FAILED: {len(failures)} problems in {wall:.0f} s: {'; '.join(failures[:3])[:400]}")
        return 1
    say(f"SOAK PASSED: {summary}; {wall:.0f} s wall; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
