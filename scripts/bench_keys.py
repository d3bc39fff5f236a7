#!/usr/bin/env python3
"""KMS calls and begin-hook overhead, measured in one run (make bench-keys).

1,000 transactions of 10 users, cold (empty key cache) then warm; and the
latency of a one-row read transaction with the hook against the same
transaction on an unhooked engine. Ends with one RESULT line.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg
import sqlalchemy as sa

from app_adapter.devstack import local_stack
from app_adapter.hook import Adapter
from app_adapter.keys import KeyService


def transactions(adapter: Adapter | None, engine: sa.Engine, users: list[str], n: int) -> float:
    """Seconds for n read transactions, users taking turns."""
    started = time.perf_counter()
    for i in range(n):
        uid = users[i % len(users)]
        token = adapter.bind(uid) if adapter else None
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT title FROM chat WHERE id = :id"), {"id": f"bench-{uid}"}).all()
        if adapter:
            adapter.unbind(token)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=1000)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="overhead runs; the median is reported")
    args = parser.parse_args()

    with local_stack("owui_crypto_bench_keys") as stack:
        service = KeyService(stack.settings, stack.url)
        users = [str(uuid.uuid4()) for _ in range(args.users)]
        with psycopg.connect(stack.url) as conn:
            for uid in users:
                conn.execute('INSERT INTO public."user" (id, email) VALUES (%s, %s)', (uid, f"{uid}@bench"))
                service.provision(conn, uid)
        url = stack.url.replace("postgresql://", "postgresql+psycopg://", 1)
        hooked = sa.create_engine(url, pool_size=2)
        adapter = Adapter(service)
        adapter.install(hooked)
        for uid in users:
            with adapter.acting_as_sync(uid), hooked.begin() as conn:
                conn.execute(sa.text("INSERT INTO chat (id, user_id, title, meta) VALUES (:id, :u, 'bench', '{}')"),
                             {"id": f"bench-{uid}", "u": uid})

        def decrypts() -> int:
            return service.kms.metrics()["calls"].get("Decrypt", 0)

        service.cache.clear()
        before = decrypts()
        transactions(adapter, hooked, users, args.transactions)
        cold = decrypts() - before
        before = decrypts()
        transactions(adapter, hooked, users, args.transactions)
        warm = decrypts() - before

        plain = sa.create_engine(url, pool_size=2,
                                 connect_args={"options": "-c search_path=owui_crypto_view,public,pg_temp"})
        with_hook, without = [], []
        for _ in range(args.repeats):
            without.append(transactions(None, plain, users, args.transactions))
            with_hook.append(transactions(adapter, hooked, users, args.transactions))
        per_tx_with = statistics.median(with_hook) / args.transactions * 1e6
        per_tx_without = statistics.median(without) / args.transactions * 1e6
        ratio = per_tx_with / per_tx_without
        m = adapter.metrics()
        print(f"{args.transactions} transactions of {args.users} users")
        print(f"  KMS Decrypt calls, cold cache: {cold}")
        print(f"  KMS Decrypt calls, warm cache: {warm}")
        print(f"  read transaction, hooked:   {per_tx_with:8.1f} us (median of {args.repeats})")
        print(f"  read transaction, unhooked: {per_tx_without:8.1f} us")
        print(f"  activate() round trips per transaction: {m['round_trips'] / m['transactions']:.3f}"
              f" ({m['with_begin'] / m['activations']:.3f} of activations sent with the transaction's BEGIN)")
        print(f"RESULT kms_calls_cold={cold} kms_calls_warm={warm} hook_latency_ratio={ratio:.2f}")
        hooked.dispose()
        plain.dispose()
        service.kms.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
