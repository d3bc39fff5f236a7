"""Prometheus metrics of owui-crypto, on a port of their own (``OWUI_CRYPTO_METRICS_PORT``).

``owui-crypto serve`` starts the exporter when the variable is set; it listens on 127.0.0.1 unless
``HOST:PORT`` names another address. Nothing is counted twice: :class:`OwuiCryptoCollector` reads, at scrape
time, the counters the code keeps anyway -- :meth:`KmsKeys.metrics`, :meth:`KeyCache.stats`,
:meth:`Adapter.metrics`, :func:`app_adapter.owui.responses.refusal_counts` -- so a request pays nothing for
being measured, and a process without an exporter pays nothing either.

Sealed and opened values are measured only where PostgreSQL already counts them:
``pg_stat_user_functions``, when ``track_functions`` is ``pl`` or ``all`` (one query per scrape). Their bytes
are not measured: that would cost something per value, on the hot path.

Labels are KMS operation names, error class names and SQLSTATEs: never a user id, an email or a key, so a
scrape shows how much happens, not to whom, and series stay few.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import psycopg
from prometheus_client.exposition import start_wsgi_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from app_adapter import errors
from app_adapter.config import Settings
from app_adapter.kms import LATENCY_BUCKETS, SERVICE_OPERATIONS
from app_adapter.sqlrows import scalar

__all__ = ["DB_FUNCTIONS", "KMS_ERRORS", "SQLSTATES", "Exporter", "OwuiCryptoCollector", "serve_metrics", "start"]

log = logging.getLogger(__name__)

#: Error classes KmsKeys counts: each has a zero series per operation from the start, so the first error is
#: an increase (a series that appears at 1 is invisible to rate() and increase()).
KMS_ERRORS = ("KeyUnavailable", "CannotUnwrap", "KmsThrottled", "KmsUnreachable", "KmsError", "InvalidInput")

#: owui-crypto's refusals (OC001...), zero from the start for the same reason.
SQLSTATES = tuple(sorted(cls.sqlstate for cls in errors.DatabaseRefusal.__subclasses__()))

#: PL/pgSQL functions whose calls PostgreSQL counts with ``track_functions = pl``: ``fernet_seal`` runs once
#: per value sealed; ``fernet_open`` once per value opened and once per key unwrapped by ``activate()``
#: (through ``unwrap_transported``), so values opened = fernet_open - unwrap_transported.
DB_FUNCTIONS = ("fernet_seal", "fernet_open", "unwrap_transported", "activate")

_DB_STATS = """SELECT funcname, sum(calls)::bigint, sum(total_time)::float8 / 1000
                 FROM pg_catalog.pg_stat_user_functions
                WHERE schemaname = 'owui_crypto' AND funcname = ANY(%s) GROUP BY funcname"""


class KmsSource(Protocol):
    def metrics(self) -> Mapping[str, Any]: ...


class CacheSource(Protocol):
    def stats(self) -> Mapping[str, int]: ...


class AdapterSource(Protocol):
    def metrics(self) -> Mapping[str, int]: ...


def _counter(name: str, documentation: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"owui_crypto_{name}", documentation, labels=list(labels))


def _gauge(name: str, documentation: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"owui_crypto_{name}", documentation, labels=list(labels))


class OwuiCryptoCollector(Collector):
    """Reads owui-crypto's own counters when Prometheus scrapes.

    ``kms`` and ``cache`` exist from the start of ``serve``; the engine hook and the refusal notes exist once
    Open WebUI is imported and hooked, and are handed over then with :meth:`attach` (their series are absent
    until that moment). ``dsn`` (a libpq URL) adds the database's function statistics.
    """

    def __init__(self, kms: KmsSource, cache: CacheSource, *, cache_capacity: int | None = None,
                 dsn: str | None = None) -> None:
        self.kms = kms
        self.cache = cache
        self.cache_capacity = cache_capacity
        self.dsn = dsn
        self.adapter: AdapterSource | None = None
        self.refusals: Callable[[], Mapping[str, int]] | None = None

    def attach(self, adapter: AdapterSource, refusals: Callable[[], Mapping[str, int]]) -> None:
        """The engine hook's counters and the refusal counts, once they exist."""
        self.adapter = adapter
        self.refusals = refusals

    def describe(self) -> Iterable[Metric]:
        # Registering would otherwise collect once to learn the names, and collecting queries the database.
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._kms()
        yield from self._cache()
        if self.adapter is not None:
            yield from self._adapter(self.adapter.metrics())
        if self.refusals is not None:
            refusals = _counter("refusals", "Refusals of owui-crypto's SQL seen by this process, by SQLSTATE "
                                            "(OC002 not the owner, OC001 no key active...)", ["sqlstate"])
            counts = {state: 0 for state in SQLSTATES} | dict(self.refusals())
            for state, count in sorted(counts.items()):
                refusals.add_metric([state], count)
            yield refusals
        if self.dsn is not None:
            yield from self._database(self.dsn)

    # -- sources --------------------------------------------------------------------------------------

    def _kms(self) -> Iterable[Metric]:
        m = self.kms.metrics()
        operations = sorted(set(SERVICE_OPERATIONS) | set(m["calls"]) | set(m.get("latency", {})))
        requests = _counter("kms_requests", "KMS API calls, by operation (botocore's retries inside a call "
                                            "are not counted apart)", ["operation"])
        failures = _counter("kms_errors", "KMS calls that failed, by operation and owui-crypto error class",
                            ["operation", "error"])
        throttled = _counter("kms_throttled_answers", "Throttling answers of KMS (ThrottlingException, "
                                                      "LimitExceededException), each attempt counted, retried "
                                                      "ones included", ["operation"])
        latency = HistogramMetricFamily("owui_crypto_kms_request_duration_seconds",
                                        "Duration of KMS calls, retries included, by operation",
                                        labels=["operation"])
        by_operation = m.get("errors_by_operation", {})
        empty = {"buckets": [(bound, 0) for bound in (*LATENCY_BUCKETS, math.inf)], "sum": 0.0}
        for operation in operations:
            requests.add_metric([operation], m["calls"].get(operation, 0))
            seen = by_operation.get(operation, {})
            for error in sorted(set(KMS_ERRORS) | set(seen)):
                failures.add_metric([operation, error], seen.get(error, 0))
            throttled.add_metric([operation], m.get("throttled_answers", {}).get(operation, 0))
            histogram = m.get("latency", {}).get(operation, empty)
            latency.add_metric([operation], [(floatToGoString(bound), count) for bound, count in histogram["buckets"]],
                               histogram["sum"])
        yield from (requests, failures, throttled, latency)

    def _cache(self) -> Iterable[Metric]:
        s = self.cache.stats()
        described = {
            "hits": "Key lookups answered from the per-process DEK cache",
            "misses": "Key lookups not in the cache (each waits for a load: KMS Decrypt, or another caller's)",
            "loads": "Loads of a missing key (one KMS Decrypt each, shared by concurrent callers)",
            "load_failures": "Loads that failed (KMS error, user without a key); not cached, tried again next time",
            "evictions": "Keys dropped because the cache was full (OWUI_CRYPTO_KEY_CACHE_SIZE)",
            "expirations": "Keys dropped at the end of their time (OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS)",
            "invalidations": "Keys dropped on purpose (a user deleted: crypto-shredding)",
        }
        for key, documentation in described.items():
            family = _counter(f"key_cache_{key}", documentation)
            family.add_metric([], s.get(key, 0))
            yield family
        entries = _gauge("key_cache_entries", "Keys in the per-process DEK cache now")
        entries.add_metric([], s.get("entries", 0))
        yield entries
        if self.cache_capacity is not None:
            capacity = _gauge("key_cache_capacity", "Most keys the cache keeps (OWUI_CRYPTO_KEY_CACHE_SIZE)")
            capacity.add_metric([], self.cache_capacity)
            yield capacity

    @staticmethod
    def _adapter(counts: Mapping[str, int]) -> Iterable[Metric]:
        # An eager hook (Adapter(lazy=False), or a release before lazy activation) activates every transaction.
        activations = counts.get("activations", counts.get("transactions", 0))
        for name, value, documentation in (
            ("transactions", counts.get("transactions", 0), "Transactions begun on the hooked engines"),
            ("activations", activations, "Transactions given keys with owui_crypto.activate()"),
            ("activation_round_trips", counts.get("round_trips", 0),
             "activate() round trips (more than activations when a pooler moved a client to a new backend)"),
            ("activations_with_begin", counts.get("with_begin", 0),
             "Activations sent in one network flight with their transaction's BEGIN (no round trip of their own)"),
            ("transport_renewals", counts.get("transport_renewals", 0),
             "Transport entries made because a client met a backend for the first time (new connection, "
             "or a pooler move)"),
        ):
            family = _counter(name, documentation)
            family.add_metric([], value)
            yield family

    @staticmethod
    def _database(dsn: str) -> Iterable[Metric]:
        """``pg_stat_user_functions`` of owui-crypto's functions: database-wide (every client of the database,
        every instance), not this process's."""
        up = _gauge("db_stats_up", "1 when the database answered this scrape's statistics query")
        try:
            # A short transaction: SET LOCAL ends with it, so nothing stays on a pooled server connection.
            with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn, conn.transaction():
                conn.execute("SET LOCAL statement_timeout = 2000")
                setting = str(scalar(conn, "SELECT pg_catalog.current_setting('track_functions')"))
                rows = {str(name): (int(calls), float(seconds))
                        for name, calls, seconds in conn.execute(_DB_STATS, (list(DB_FUNCTIONS),))}
        except psycopg.Error as exc:
            log.warning("owui-crypto metrics: database statistics unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        track = _gauge("db_track_functions", "PostgreSQL's track_functions as this exporter's session sees it: "
                                             "none means sealed and opened values are not measured", ["setting"])
        track.add_metric([setting], 1)
        yield track
        if setting == "none":
            return
        calls = _counter("db_function_calls", "Calls of owui-crypto's PL/pgSQL functions, database-wide "
                                              "(pg_stat_user_functions)", ["function"])
        seconds = _counter("db_function_seconds", "Time in owui-crypto's PL/pgSQL functions, callees included, "
                                                  "database-wide (pg_stat_user_functions)", ["function"])
        for function in DB_FUNCTIONS:
            count, total = rows.get(function, (0, 0.0))
            calls.add_metric([function], count)
            seconds.add_metric([function], total)
        sealed = _counter("db_values_sealed", "Values sealed, database-wide (calls of fernet_seal)")
        sealed.add_metric([], rows.get("fernet_seal", (0, 0.0))[0])
        opened = _counter("db_values_opened", "Values opened (decrypted), database-wide "
                                              "(calls of fernet_open less those of unwrap_transported)")
        opened.add_metric([], max(0, rows.get("fernet_open", (0, 0.0))[0]
                                  - rows.get("unwrap_transported", (0, 0.0))[0]))
        yield from (calls, seconds, sealed, opened)


@dataclass
class Exporter:
    """A running exporter: the collector (to :meth:`OwuiCryptoCollector.attach` later) and its HTTP server."""

    collector: OwuiCryptoCollector
    server: WSGIServer
    thread: threading.Thread
    host: str

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(collector: OwuiCryptoCollector, host: str, port: int) -> Exporter:
    """Serve ``collector`` (and the process's CPU, memory and file descriptors) on ``host:port``, in a daemon
    thread; port 0 picks a free one. Raises :class:`ConfigError` when the address cannot be bound."""
    registry = CollectorRegistry()  # our own: only what is registered here, nothing another library adds
    registry.register(collector)
    ProcessCollector(registry=registry)
    try:
        server, thread = start_wsgi_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise errors.ConfigError(f"OWUI_CRYPTO_METRICS_PORT: cannot listen on {host}:{port} "
                                 f"({exc.strerror or exc}); choose another port or unset it") from None
    return Exporter(collector, server, thread, host)


def start(settings: Settings, keys: Any) -> Exporter | None:
    """The exporter ``owui-crypto serve`` runs for ``keys`` (a :class:`~app_adapter.keys.KeyService`), or None
    when ``OWUI_CRYPTO_METRICS_PORT`` is unset."""
    if settings.metrics_port is None:
        return None
    collector = OwuiCryptoCollector(keys.kms, keys.cache, cache_capacity=settings.key_cache_size, dsn=keys.dsn)
    return serve_metrics(collector, settings.metrics_host, settings.metrics_port)
