#!/usr/bin/env python3
"""SQL Fernet against Python's cryptography.fernet, as throughput ratios (make bench-sql).

For each value size, the same random values are sealed and opened N times
server-side, in one statement (values held in memory, so per-statement
overhead and detoasting stay out of it), and N times in Python with
cryptography.fernet.Fernet. N is chosen so one SQL measurement lasts at least
--seconds; each figure is the best of --repeat runs, SQL and Python taking
turns. Throughput counts plaintext bytes. Ends with one line:

    RESULT open_vs_python=<x> seal_vs_python=<y>

x and y are geometric means over the sizes of SQL throughput / Python
throughput, for the operations named in RESULT_OF below.
"""

from __future__ import annotations

import argparse
import base64
import gc
import math
import os
import sys
import time
from pathlib import Path

import psycopg
from cryptography.fernet import Fernet

from app_adapter import devdb

REPO = Path(__file__).resolve().parents[1]

# -- what is measured: edit here ----------------------------------------------
# SQL run once in the throw-away database, then these files of sql/.
SETUP = ("CREATE SCHEMA owui_crypto", "CREATE EXTENSION pgcrypto WITH SCHEMA owui_crypto")
SQL_FILES = ("10_fernet.sql",)
# operation -> (SQL expression timed once per value, Python Fernet method it is compared with).
# In the expression k is the 32-byte key (bytea), m the message (bytea), t a
# Fernet token of m under k made by Python (text) and s what SEALED_BY made of
# m in SQL (for openers that take their own format, e.g. an envelope).
SEALED_BY = "owui_crypto.fernet_seal(k, m)"
MEASURED = {
    "seal": ("owui_crypto.fernet_seal(k, m)", "encrypt"),
    "open": ("owui_crypto.fernet_open(k, t)", "decrypt"),
}
# RESULT field -> operation.
RESULT_OF = {"open_vs_python": "open", "seal_vs_python": "seal"}
# ------------------------------------------------------------------------------

DISTINCT = 8  # distinct values per size; the N operations cycle through them

# Each array is an uncorrelated subquery (an InitPlan): built once per
# statement, in memory, and only if the expression uses it.
TIMED = """
SELECT count({expr})
  FROM generate_series(0, %(n)s - 1) AS g,
       LATERAL (SELECT %(key)s::bytea AS k,
                       (SELECT array_agg(m ORDER BY i) FROM bench_value)[1 + g %% {distinct}] AS m,
                       (SELECT array_agg(t ORDER BY i) FROM bench_value)[1 + g %% {distinct}] AS t,
                       (SELECT array_agg(s ORDER BY i) FROM bench_value)[1 + g %% {distinct}] AS s) AS x
"""


def sql_seconds(conn: psycopg.Connection, expr: str, key: bytes, n: int) -> float:
    query = TIMED.format(expr=expr, distinct=DISTINCT)
    started = time.perf_counter()
    count = conn.execute(query, {"n": n, "key": key}).fetchone()[0]
    elapsed = time.perf_counter() - started
    if count != n:
        raise RuntimeError(f"{expr}: counted {count} results for {n} values")
    return elapsed


def python_seconds(fernet: Fernet, method: str, inputs: list, n: int) -> float:
    call = getattr(fernet, method)
    gc.disable()  # as timeit does
    try:
        started = time.perf_counter()
        for i in range(n):
            call(inputs[i % DISTINCT])
        return time.perf_counter() - started
    finally:
        gc.enable()


def calibrate(conn: psycopg.Connection, expr: str, key: bytes, seconds: float) -> int:
    """N for which one SQL run lasts about `seconds` (a little more)."""
    n = 8
    while True:
        elapsed = sql_seconds(conn, expr, key, n)
        if elapsed >= seconds / 4 or n >= 1 << 24:
            return max(1, math.ceil(n * seconds * 1.1 / elapsed))
        n *= 8 if elapsed < seconds / 64 else 2


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def install(conn: psycopg.Connection) -> None:
    for statement in SETUP:
        conn.execute(statement)
    for name in SQL_FILES:
        conn.execute((REPO / "sql" / name).read_text(encoding="utf-8"))
    conn.execute("CREATE TABLE bench_value (i int PRIMARY KEY, m bytea NOT NULL, t text NOT NULL, s text)")
    conn.execute("SET jit = off")  # measure the functions, not JIT compilation


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,16384,262144",
                        help="value sizes in bytes, comma-separated (default: 1 KiB, 16 KiB, 256 KiB)")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="least duration of one SQL measurement (default: 0.5)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best counts (default: 5)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    try:
        server = devdb.find_server()
    except devdb.NoServer as exc:
        print(exc, file=sys.stderr)
        return 2
    key = os.urandom(32)
    fernet = Fernet(base64.urlsafe_b64encode(key))
    ratios: dict[str, list[float]] = {op: [] for op in MEASURED}
    started = time.perf_counter()
    print(f"PostgreSQL: {server.origin}; {DISTINCT} distinct random values per size, best of {args.repeat}")
    print(f"{'size':>8}  {'operation':<20} {'N':>8}  {'SQL MB/s':>9}  {'Python MB/s':>11}  {'SQL/Python':>10}")
    try:
        with server.scratch_database("owui_crypto_bench_sql") as name, \
                psycopg.connect(server.url(name), autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            install(conn)
            for size in sizes:
                messages = [os.urandom(size) for _ in range(DISTINCT)]
                tokens = [fernet.encrypt(m) for m in messages]
                conn.execute("TRUNCATE bench_value")
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO bench_value (i, m, t) VALUES (%s, %s, %s)",
                                    [(i, m, t.decode()) for i, (m, t) in enumerate(zip(messages, tokens, strict=True))])
                conn.execute(f"UPDATE bench_value SET s = (SELECT {SEALED_BY} FROM (SELECT %s::bytea AS k, m) AS x)",
                             (key,))
                for op, (expr, method) in MEASURED.items():
                    python_inputs = messages if method == "encrypt" else tokens
                    n = calibrate(conn, expr, key, args.seconds)
                    sql_best = py_best = math.inf
                    for _ in range(args.repeat):  # SQL and Python take turns, so drift hits both
                        sql_best = min(sql_best, sql_seconds(conn, expr, key, n))
                        py_best = min(py_best, python_seconds(fernet, method, python_inputs, n))
                    sql_rate, py_rate = size * n / sql_best / 1e6, size * n / py_best / 1e6
                    ratios[op].append(sql_rate / py_rate)
                    print(f"{size_label(size):>8}  {op:<20} {n:>8}  {sql_rate:>9.1f}  {py_rate:>11.1f}  "
                          f"{sql_rate / py_rate:>10.2f}", flush=True)
    finally:
        if server.keepalive is not None:
            server.keepalive.stop()

    print(f"PostgreSQL {version}; {time.perf_counter() - started:.0f} s")
    for op, values in ratios.items():
        if op not in RESULT_OF.values():
            print(f"{op}: geometric mean SQL/Python {geomean(values):.2f} (not in RESULT)")
    print("RESULT " + " ".join(f"{field}={geomean(ratios[op]):.2f}" for field, op in RESULT_OF.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
