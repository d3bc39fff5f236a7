"""KeyCache: TTL, LRU bound, single flight for threads and asyncio, failures."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Callable

import pytest

from app_adapter.config import Settings
from app_adapter.keycache import KeyCache
from app_adapter.secret import SecretBytes

N = 16
WAIT = 10.0  # generous bound for slow CI; the tests finish in milliseconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dek(n: int) -> SecretBytes:
    return SecretBytes(bytes([n]) * 32)


def counting(value: SecretBytes) -> tuple[Callable[[], SecretBytes], list[int]]:
    calls: list[int] = []

    def loader() -> SecretBytes:
        calls.append(1)
        return value

    return loader, calls


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


async def await_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_hit_after_load() -> None:
    cache = KeyCache(10, 60)
    loader, calls = counting(dek(1))
    assert cache.get("u", loader) == dek(1)
    assert cache.get("u", loader) is cache.get("u", loader)
    assert len(calls) == 1
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["loads"], stats["entries"]) == (2, 1, 1, 1)


def test_ttl_expiry_reloads() -> None:
    clock = FakeClock()
    cache = KeyCache(10, 300, clock=clock)
    loader, calls = counting(dek(1))
    cache.get("u", loader)
    clock.now += 299.999
    cache.get("u", loader)
    assert len(calls) == 1
    clock.now += 0.001  # exactly the TTL: expired
    cache.get("u", loader)
    assert len(calls) == 2
    assert cache.stats()["expirations"] == 1


def test_lru_bound_drops_least_recently_used() -> None:
    cache = KeyCache(2, 60)
    cache.get("a", lambda: dek(1))
    cache.get("b", lambda: dek(2))
    cache.get("a", lambda: dek(9))  # a is now the most recent
    cache.get("c", lambda: dek(3))  # drops b
    assert len(cache) == 2
    assert cache.stats()["evictions"] == 1
    loader, calls = counting(dek(2))
    cache.get("a", loader)
    cache.get("c", loader)
    assert calls == []
    cache.get("b", loader)
    assert calls == [1]


def test_evict_and_clear() -> None:
    cache = KeyCache(10, 60)
    cache.get("a", lambda: dek(1))
    cache.get("b", lambda: dek(2))
    assert cache.evict("a") is True
    assert cache.evict("a") is False
    loader, calls = counting(dek(7))
    assert cache.get("a", loader) == dek(7)
    cache.clear()
    assert len(cache) == 0
    cache.get("b", loader)
    assert len(calls) == 2
    assert cache.stats()["invalidations"] == 3


def test_failure_reaches_the_caller_and_is_not_cached() -> None:
    cache = KeyCache(10, 60)

    def broken() -> SecretBytes:
        raise RuntimeError("KMS down")

    with pytest.raises(RuntimeError, match="KMS down"):
        cache.get("u", broken)
    assert len(cache) == 0
    loader, calls = counting(dek(1))
    assert cache.get("u", loader) == dek(1)
    assert calls == [1]
    assert cache.stats()["load_failures"] == 1


def test_loader_must_return_secret_bytes() -> None:
    cache = KeyCache(10, 60)
    with pytest.raises(TypeError, match="SecretBytes, got bytes"):
        cache.get("u", lambda: b"\x01" * 32)  # type: ignore[arg-type,return-value]
    assert len(cache) == 0


def test_single_flight_with_threads() -> None:
    cache = KeyCache(10, 60)
    calls: list[int] = []

    def loader() -> SecretBytes:
        calls.append(1)
        # Hold the load open until every thread has missed and is waiting.
        wait_until(lambda: cache.stats()["misses"] == N)
        return dek(5)

    results: list[SecretBytes] = []
    start = threading.Barrier(N)

    def worker() -> None:
        start.wait()
        results.append(cache.get("u", loader))

    threads = [threading.Thread(target=worker) for _ in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(calls) == 1
    assert len(results) == N
    assert all(r is results[0] for r in results)
    assert cache.stats()["loads"] == 1


def test_single_flight_failure_reaches_every_thread_and_is_not_cached() -> None:
    cache = KeyCache(10, 60)
    calls: list[int] = []

    def loader() -> SecretBytes:
        calls.append(1)
        wait_until(lambda: cache.stats()["misses"] == N)
        raise ValueError("unwrap failed")

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            cache.get("u", loader)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(calls) == 1
    assert len(errors) == N
    assert len(cache) == 0
    assert cache.get("u", lambda: dek(3)) == dek(3)


def test_single_flight_with_asyncio_tasks() -> None:
    cache = KeyCache(10, 60)
    calls: list[int] = []

    async def loader() -> SecretBytes:
        calls.append(1)
        await await_until(lambda: cache.stats()["misses"] == N)
        return dek(6)

    async def main() -> list[SecretBytes]:
        return await asyncio.gather(*(cache.aget("u", loader) for _ in range(N)))

    results = asyncio.run(main())
    assert len(calls) == 1
    assert all(r is results[0] for r in results) and results[0] == dek(6)


def test_aget_runs_a_sync_loader_in_a_thread_once() -> None:
    cache = KeyCache(10, 60)
    calls: list[str] = []

    def loader() -> SecretBytes:
        calls.append(threading.current_thread().name)
        wait_until(lambda: cache.stats()["misses"] == N)  # would block the loop if run on it
        return dek(7)

    async def main() -> list[SecretBytes]:
        return await asyncio.gather(*(cache.aget("u", loader) for _ in range(N)))

    results = asyncio.run(main())
    assert len(calls) == 1 and calls[0] != threading.main_thread().name
    assert all(r == dek(7) for r in results)


def test_async_failure_reaches_every_task_and_is_not_cached() -> None:
    cache = KeyCache(10, 60)
    calls: list[int] = []

    async def loader() -> SecretBytes:
        calls.append(1)
        await await_until(lambda: cache.stats()["misses"] == N)
        raise ValueError("unwrap failed")

    async def main() -> list[object]:
        return await asyncio.gather(*(cache.aget("u", loader) for _ in range(N)), return_exceptions=True)

    results = asyncio.run(main())
    assert len(calls) == 1
    assert all(isinstance(r, ValueError) for r in results)
    assert len(cache) == 0


def test_threads_and_tasks_share_one_load() -> None:
    cache = KeyCache(10, 60)
    calls: list[int] = []

    async def loader() -> SecretBytes:
        calls.append(1)
        await await_until(lambda: cache.stats()["misses"] == 2 * N)
        return dek(8)

    thread_results: list[SecretBytes] = []

    def worker() -> None:
        wait_until(lambda: cache.stats()["loads"] == 1)  # join the task's load
        thread_results.append(cache.get("u", lambda: dek(99)))

    threads = [threading.Thread(target=worker) for _ in range(N)]
    for t in threads:
        t.start()

    async def main() -> list[SecretBytes]:
        return await asyncio.gather(*(cache.aget("u", loader) for _ in range(N)))

    task_results = asyncio.run(main())
    for t in threads:
        t.join(WAIT)
    assert calls == [1]
    assert all(r == dek(8) for r in [*task_results, *thread_results]) and len(thread_results) == N


def test_cancelled_leader_hands_over_to_a_waiter() -> None:
    cache = KeyCache(10, 60)

    async def main() -> SecretBytes:
        gate = asyncio.Event()

        async def slow() -> SecretBytes:
            gate.set()
            await asyncio.sleep(WAIT)
            return dek(1)

        leader = asyncio.create_task(cache.aget("u", slow))
        await gate.wait()
        waiter = asyncio.create_task(cache.aget("u", lambda: dek(2)))
        await await_until(lambda: cache.stats()["misses"] == 2)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        return await asyncio.wait_for(waiter, WAIT)

    # The waiter was not cancelled with the leader: it retried and loaded itself.
    assert asyncio.run(main()) == dek(2)
    assert cache.stats()["loads"] == 2


def test_cancelled_waiter_does_not_disturb_the_others() -> None:
    cache = KeyCache(10, 60)

    async def main() -> list[SecretBytes]:
        release = asyncio.Event()

        async def loader() -> SecretBytes:
            await release.wait()
            return dek(3)

        tasks = [asyncio.create_task(cache.aget("u", loader)) for _ in range(3)]
        await await_until(lambda: cache.stats()["misses"] == 3)
        tasks[1].cancel()
        await asyncio.sleep(0)
        release.set()
        return [await tasks[0], await tasks[2]]

    assert asyncio.run(main()) == [dek(3), dek(3)]
    assert len(cache) == 1


def test_evict_during_load_keeps_the_stale_value_out() -> None:
    cache = KeyCache(10, 60)
    loading = threading.Event()
    release = threading.Event()

    def loader() -> SecretBytes:
        loading.set()
        release.wait(WAIT)
        return dek(1)

    result: list[SecretBytes] = []
    t = threading.Thread(target=lambda: result.append(cache.get("u", loader)))
    t.start()
    assert loading.wait(WAIT)
    cache.evict("u")
    release.set()
    t.join(WAIT)
    assert result == [dek(1)]  # the caller still gets its answer
    assert len(cache) == 0  # but it is not stored


def test_repr_and_pickle_show_no_keys() -> None:
    cache = KeyCache(10, 60)
    cache.get("user-with-a-name", lambda: SecretBytes(b"\xab" * 32))
    assert "user-with-a-name" not in repr(cache) and "abab" not in repr(cache)
    with pytest.raises(TypeError):
        pickle.dumps(cache)


def test_from_settings_and_validation() -> None:
    settings = Settings(
        aws_region="us-east-1",
        hmac_key_id="alias/h",
        application_cmk_id="alias/c",
        key_cache_size=3,
        key_cache_ttl_seconds=1.5,
    )
    cache = KeyCache.from_settings(settings)
    assert "max_size=3" in repr(cache) and "ttl_seconds=1.5" in repr(cache)
    with pytest.raises(ValueError):
        KeyCache(0, 1)
    with pytest.raises(ValueError):
        KeyCache(1, 0)
