"""Per-process cache of unwrapped user DEKs.

Unwrapping a DEK costs a KMS call (a few milliseconds, and a share of an
account-wide quota); one chat request opens about a dozen transactions. The
cache keeps each user's DEK for a bounded time (TTL), keeps a bounded number
of users (least recently used dropped first), and loads each missing DEK
once however many threads or asyncio tasks ask for it at the same time
("single flight"): the first caller runs the loader, the others wait for its
result. A loader failure reaches every waiter and is not cached, so the next
request tries again.

Both the threaded and the asyncio paths share one lock-protected table and
one :class:`concurrent.futures.Future` per load in progress, so a thread and
a task asking for the same user also share one load.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from app_adapter.config import Settings
from app_adapter.secret import SecretBytes

__all__ = ["AsyncLoader", "KeyCache", "Loader"]

Loader = Callable[[], SecretBytes]
AsyncLoader = Callable[[], Awaitable[SecretBytes]]


class _Abandoned(Exception):
    """The leading caller was cancelled or interrupted before its loader finished.

    Never escapes this module: a waiter that sees it starts over, and
    becomes the new leader or joins a newer load.
    """


@dataclass(slots=True)
class _Entry:
    value: SecretBytes
    expires_at: float


class KeyCache:
    """A bounded, expiring, single-flight map from user id to DEK.

    Do not call :meth:`get` from a running event loop's thread (it blocks
    the loop, and deadlocks if an :meth:`aget` of that loop leads the same
    load); use :meth:`aget` there. A loader must not ask the cache for the
    same user.
    """

    def __init__(
        self,
        max_size: int = 10_000,
        ttl_seconds: float = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` must be monotonic; tests pass a fake one."""
        if max_size <= 0:
            raise ValueError(f"max_size must be > 0, got {max_size}")
        if not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        self._max_size = max_size
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[str, Future[SecretBytes]] = {}
        self._hits = self._misses = self._loads = self._load_failures = 0
        self._evictions = self._expirations = self._invalidations = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyCache:
        """A cache sized by ``OWUI_CRYPTO_KEY_CACHE_SIZE`` and ``..._TTL_SECONDS``."""
        return cls(settings.key_cache_size, settings.key_cache_ttl_seconds)

    def __repr__(self) -> str:
        # Sizes only: user ids are personal data, values are secrets.
        return f"KeyCache(entries={len(self)}, max_size={self._max_size}, ttl_seconds={self._ttl})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, user_id: str, loader: Loader) -> SecretBytes:
        """The DEK of ``user_id``, from the cache or from ``loader()`` run once."""
        while True:
            value, flight, leader = self._claim(user_id)
            if value is not None:
                return value
            assert flight is not None
            if leader:
                return self._lead(user_id, flight, loader)
            try:
                return flight.result()
            except _Abandoned:
                continue

    async def aget(self, user_id: str, loader: AsyncLoader | Loader) -> SecretBytes:
        """Like :meth:`get`, without blocking the event loop.

        A coroutine function is awaited; a plain callable runs in a worker
        thread (``asyncio.to_thread``), since it probably calls KMS.
        """
        while True:
            value, flight, leader = self._claim(user_id)
            if value is not None:
                return value
            assert flight is not None
            if leader:
                return await self._alead(user_id, flight, loader)
            try:
                # The flight is marked running, so cancelling this waiter
                # cannot cancel the shared future under the other waiters.
                return await asyncio.wrap_future(flight)
            except _Abandoned:
                continue

    def evict(self, user_id: str) -> bool:
        """Forget ``user_id``'s DEK; True if one was cached.

        A load already in progress still answers its waiters but is not
        stored, so a DEK read before the eviction cannot come back after it.
        """
        with self._lock:
            self._flights.pop(user_id, None)
            found = self._entries.pop(user_id, None) is not None
            self._invalidations += found
            return found

    def clear(self) -> None:
        """Forget every DEK (loads in progress are not stored either)."""
        with self._lock:
            self._invalidations += len(self._entries)
            self._entries.clear()
            self._flights.clear()

    def stats(self) -> dict[str, int]:
        """Counters since creation, and the current number of entries.

        ``hits``/``misses`` count calls; ``loads`` counts loader runs (so
        ``misses - loads`` calls waited for another caller's load);
        ``evictions`` are drops by the size bound, ``expirations`` by the
        TTL, ``invalidations`` by :meth:`evict` and :meth:`clear`.
        """
        with self._lock:
            return {
                "entries": len(self._entries),
                "hits": self._hits,
                "misses": self._misses,
                "loads": self._loads,
                "load_failures": self._load_failures,
                "evictions": self._evictions,
                "expirations": self._expirations,
                "invalidations": self._invalidations,
            }

    # -- internals ----------------------------------------------------------

    def _claim(self, user_id: str) -> tuple[SecretBytes | None, Future[SecretBytes] | None, bool]:
        """One locked step: a cached value, or the load to wait for / to lead."""
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is not None:
                if self._clock() < entry.expires_at:
                    self._entries.move_to_end(user_id)
                    self._hits += 1
                    return entry.value, None, False
                del self._entries[user_id]
                self._expirations += 1
            self._misses += 1
            flight = self._flights.get(user_id)
            if flight is not None:
                return None, flight, False
            flight = Future()
            # RUNNING futures ignore cancel(): see aget.
            flight.set_running_or_notify_cancel()
            self._flights[user_id] = flight
            self._loads += 1
            return None, flight, True

    def _lead(self, user_id: str, flight: Future[SecretBytes], loader: Loader) -> SecretBytes:
        try:
            value = _checked(loader())
        except Exception as exc:
            self._settle(user_id, flight, error=exc)
            raise
        except BaseException:
            self._settle(user_id, flight, error=_Abandoned())
            raise
        self._settle(user_id, flight, value=value)
        return value

    async def _alead(
        self, user_id: str, flight: Future[SecretBytes], loader: AsyncLoader | Loader
    ) -> SecretBytes:
        try:
            if inspect.iscoroutinefunction(loader):
                result = await loader()
            else:
                result = await asyncio.to_thread(loader)
                if inspect.isawaitable(result):  # e.g. an object with async __call__
                    result = await result
            value = _checked(result)
        except Exception as exc:
            self._settle(user_id, flight, error=exc)
            raise
        except BaseException:  # CancelledError: let a waiter take over
            self._settle(user_id, flight, error=_Abandoned())
            raise
        self._settle(user_id, flight, value=value)
        return value

    def _settle(
        self,
        user_id: str,
        flight: Future[SecretBytes],
        *,
        value: SecretBytes | None = None,
        error: BaseException | None = None,
    ) -> None:
        with self._lock:
            # Not ours any more if evict() or clear() ran during the load.
            current = self._flights.get(user_id) is flight
            if current:
                del self._flights[user_id]
            if error is not None:
                self._load_failures += 1
            elif current:
                assert value is not None
                self._entries[user_id] = _Entry(value, self._clock() + self._ttl)
                self._entries.move_to_end(user_id)
                while len(self._entries) > self._max_size:
                    self._entries.popitem(last=False)
                    self._evictions += 1
        # Outside the lock: done-callbacks (asyncio.wrap_future's) run here.
        if error is not None:
            flight.set_exception(error)
        else:
            flight.set_result(value)  # type: ignore[arg-type]


def _checked(value: object) -> SecretBytes:
    if not isinstance(value, SecretBytes):
        # Raw bytes would sit in the cache with a readable repr.
        raise TypeError(f"a key loader must return SecretBytes, got {type(value).__name__}")
    return value
