"""Monitoring: app_adapter.metrics reads the counters the code keeps, and serves them in Prometheus's text format;
the alert rules and the dashboard query only what it exports; every KMS request names its owner for CloudTrail.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import botocore.session
import psycopg
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app_adapter import errors, kms, metrics
from app_adapter.config import Settings
from app_adapter.hook import Adapter
from app_adapter.keycache import KeyCache
from app_adapter.keys import KeyService
from app_adapter.kms import KmsKeys
from app_adapter.metrics import OwuiCryptoCollector, serve_metrics
from app_adapter.owui import responses
from app_adapter.secret import SecretBytes
from tests.kms_fixtures import KmsServer
from tests.test_adapter import add_users, sa_url

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus-alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(collector: OwuiCryptoCollector) -> tuple[str, Samples]:
    """The text exposition of ``collector`` and every sample in it, parsed back by prometheus_client's parser."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def with_track_functions(db_url: str) -> str:
    """The libpq URL of a session that counts PL/pgSQL calls (track_functions is superuser-settable)."""
    return psycopg.conninfo.make_conninfo(db_url, options="-c track_functions=pl")


CHAT = sa.table("chat", sa.column("id"), sa.column("user_id"), sa.column("title"), sa.column("chat", sa.JSON),
                sa.column("meta", sa.JSON))


# -- the collector reads the counters ------------------------------------------------------------------


def test_kms_series_are_the_kms_counters(kms_settings: Settings) -> None:
    with KmsKeys(kms_settings) as keys:
        keys.user_id("alice@example.com")
        keys.user_id("bob@example.com")
        _, blob = keys.new_dek("user-a")
        keys.unwrap_dek("user-a", blob)
        with pytest.raises(errors.CannotUnwrap):
            keys.unwrap_dek("user-b", blob)  # another user's context: KMS refuses
        _, samples = scrape(OwuiCryptoCollector(keys, KeyCache()))
        counted = keys.metrics()
    for operation, calls in counted["calls"].items():
        assert value(samples, "owui_crypto_kms_requests_total", operation=operation) == calls
        assert value(samples, "owui_crypto_kms_request_duration_seconds_count", operation=operation) == calls
        assert value(samples, "owui_crypto_kms_request_duration_seconds_sum", operation=operation) == \
            pytest.approx(counted["latency"][operation]["sum"])
    assert counted["calls"] == {"DescribeKey": 1, "GenerateMac": 2, "GenerateDataKey": 1, "Decrypt": 2}
    assert value(samples, "owui_crypto_kms_errors_total", operation="Decrypt", error="CannotUnwrap") == 1
    # Every service operation and error class has a series from the start, at zero.
    assert value(samples, "owui_crypto_kms_requests_total", operation="Encrypt") == 0
    assert value(samples, "owui_crypto_kms_errors_total", operation="Encrypt", error="KmsThrottled") == 0
    assert value(samples, "owui_crypto_kms_throttled_answers_total", operation="Decrypt") == 0
    assert value(samples, "owui_crypto_kms_request_duration_seconds_bucket", operation="Encrypt", le="+Inf") == 0
    buckets = [value(samples, "owui_crypto_kms_request_duration_seconds_bucket", operation="GenerateMac",
                     le=str(bound)) for bound in kms.LATENCY_BUCKETS]
    assert buckets == sorted(buckets) and buckets[-1] <= 2


class ThrottlingKms:
    """A KMS endpoint on 127.0.0.1 that answers ThrottlingException ``throttle`` times, then a valid Decrypt."""

    def __init__(self, throttle: int) -> None:
        self.left = throttle
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests += 1
                if owner.left > 0:
                    owner.left -= 1
                    status, body = 400, {"__type": "ThrottlingException", "message": "Rate exceeded"}
                else:
                    status, body = 200, {"KeyId": "arn:aws:kms:us-east-1:111122223333:key/k",
                                         "Plaintext": base64.b64encode(bytes(32)).decode(),
                                         "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("throttle", "fails"), [(1, False), (2, True)])
def test_throttled_answers_count_every_attempt_even_when_a_retry_succeeds(
        kms_settings: Settings, monkeypatch: pytest.MonkeyPatch, throttle: int, fails: bool) -> None:
    endpoint = ThrottlingKms(throttle)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint.url)
    try:
        with KmsKeys(kms_settings) as keys:  # two attempts per call
            if fails:
                with pytest.raises(errors.KmsThrottled):
                    keys.unwrap_dek("user-a", b"blob")
            else:
                assert len(keys.unwrap_dek("user-a", b"blob")) == 32
            _, samples = scrape(OwuiCryptoCollector(keys, KeyCache()))
    finally:
        endpoint.close()
    assert endpoint.requests == throttle + (0 if fails else 1)
    assert value(samples, "owui_crypto_kms_throttled_answers_total", operation="Decrypt") == throttle
    assert value(samples, "owui_crypto_kms_requests_total", operation="Decrypt") == 1  # one call, retries inside
    assert value(samples, "owui_crypto_kms_errors_total", operation="Decrypt", error="KmsThrottled") == int(fails)


def test_cache_series_are_the_cache_counters(kms_settings: Settings) -> None:
    now = [0.0]
    cache = KeyCache(max_size=2, ttl_seconds=10, clock=lambda: now[0])
    key = SecretBytes(bytes(32))
    for user in ("a", "b", "c", "c"):  # three loads (a evicted by c), one hit
        cache.get(user, lambda: key)
    now[0] = 11.0
    cache.get("b", lambda: key)  # expired: a miss and a load
    cache.evict("c")
    with KmsKeys(kms_settings) as keys:
        _, samples = scrape(OwuiCryptoCollector(keys, cache, cache_capacity=2))
    stats = cache.stats()
    for key_name in ("hits", "misses", "loads", "load_failures", "evictions", "expirations", "invalidations"):
        assert value(samples, f"owui_crypto_key_cache_{key_name}_total") == stats[key_name], key_name
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["expirations"], stats["invalidations"]) == \
        (1, 4, 1, 1, 1)
    assert value(samples, "owui_crypto_key_cache_entries") == stats["entries"] == 1
    assert value(samples, "owui_crypto_key_cache_capacity") == 2


def test_activation_and_refusal_series_are_the_hooks_counters(db_url: str, service: KeyService) -> None:
    alice, bob = add_users(db_url, service, 2)
    engine = sa.create_engine(sa_url(db_url), pool_size=2, max_overflow=0)
    adapter = Adapter(service)
    adapter.install(engine)
    responses.watch_engine(engine)
    collector = OwuiCryptoCollector(service.kms, service.cache)
    _, before = scrape(collector)
    assert not any(name == "owui_crypto_activations_total" for name, _ in before)  # absent until attached
    collector.attach(adapter, responses.refusal_counts)
    refused_before = responses.refusal_counts().get("OC002", 0)
    try:
        with adapter.acting_as_sync(alice):
            with engine.begin() as conn:
                conn.execute(sa.insert(CHAT).values(id="c-alice", user_id=alice, title="alice's secret",
                                                    chat={"history": {"messages": {}}}, meta={}))
            with engine.begin() as conn:
                conn.execute(sa.select(CHAT.c.title)).all()
        with adapter.acting_as_sync(bob):
            with pytest.raises(sa.exc.DBAPIError):
                with engine.begin() as conn:
                    conn.execute(sa.update(CHAT).where(CHAT.c.id == "c-alice").values(title="taken"))
        text, samples = scrape(collector)
    finally:
        adapter.uninstall()
        engine.dispose()
    counts = adapter.metrics()
    assert counts["activations"] >= 3
    assert value(samples, "owui_crypto_transactions_total") == counts["transactions"]
    assert value(samples, "owui_crypto_activations_total") == counts["activations"]
    assert value(samples, "owui_crypto_activation_round_trips_total") == counts["round_trips"] >= counts["activations"]
    assert value(samples, "owui_crypto_transport_renewals_total") == counts["transport_renewals"]
    assert value(samples, "owui_crypto_refusals_total", sqlstate="OC002") == refused_before + 1
    for state in metrics.SQLSTATES:  # every refusal has a series, from zero
        assert ("owui_crypto_refusals_total", frozenset({("sqlstate", state)})) in samples
    stats = service.cache.stats()
    assert value(samples, "owui_crypto_key_cache_misses_total") == stats["misses"] == 2
    assert value(samples, "owui_crypto_key_cache_hits_total") == stats["hits"]
    assert value(samples, "owui_crypto_kms_requests_total", operation="Decrypt") == \
        service.kms.metrics()["calls"]["Decrypt"]
    # Counts, not people: no user id, email or key in any label.
    for user in (alice, bob):
        assert user not in text and f"{user}@example.com" not in text


def test_database_statistics_count_sealed_and_opened_values(db_url: str, app: psycopg.Connection,
                                                            keyring: Any) -> None:
    alice = keyring.user()
    app.execute("SET track_functions = 'pl'")  # superuser-settable; operators set it on the server or database
    # A new backend: the first activate() hands out a transport entry, the second unwraps both keys with it.
    transport = keyring.activate(app, alice)
    sealed = [app.execute("SELECT owui_crypto.seal_text(%s, 'owner', %s, %s)",
                          (f"value {i}", alice, f"chat.title/{i}")).fetchone()[0] for i in range(7)]
    for i, envelope in enumerate(sealed[:5]):
        assert app.execute("SELECT owui_crypto.open_text(%s, %s, '[encrypted]')",
                           (envelope, f"chat.title/{i}")).fetchone()[0] == f"value {i}"
    app.commit()
    app.close()  # a backend flushes its function statistics at the latest when it exits

    collector = OwuiCryptoCollector(KeyCacheKms(), KeyCache(), dsn=with_track_functions(db_url))

    def counted() -> bool:
        samples = scrape(collector)[1]
        return samples.get(("owui_crypto_db_values_sealed_total", frozenset()), 0) == 7

    wait_until(counted)
    _, samples = scrape(collector)
    assert value(samples, "owui_crypto_db_stats_up") == 1
    assert value(samples, "owui_crypto_db_track_functions", setting="pl") == 1
    assert value(samples, "owui_crypto_db_values_opened_total") == 5  # fernet_open 5 + 2 transport tokens - 2
    assert value(samples, "owui_crypto_db_function_calls_total", function="unwrap_transported") == 2
    assert value(samples, "owui_crypto_db_function_calls_total", function="activate") == transport.round_trips == 2
    assert value(samples, "owui_crypto_db_function_seconds_total", function="fernet_seal") > 0


class KeyCacheKms:
    """A KMS source with no calls yet (the database tests need no KMS)."""

    def metrics(self) -> dict[str, Any]:
        return {"calls": {}, "errors": {}, "errors_by_operation": {}, "throttled_answers": {}, "latency": {}}


def test_database_statistics_say_when_they_are_not_measured(db_url: str) -> None:
    collector = OwuiCryptoCollector(KeyCacheKms(), KeyCache(), dsn=db_url)
    with psycopg.connect(db_url) as conn:
        setting = conn.execute("SHOW track_functions").fetchone()[0]
    if setting != "none":
        pytest.skip(f"this server runs with track_functions = {setting}")
    _, samples = scrape(collector)
    assert value(samples, "owui_crypto_db_track_functions", setting="none") == 1
    assert not any(name.startswith("owui_crypto_db_values") for name, _ in samples)


def test_an_unreachable_database_costs_only_its_own_series() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    collector = OwuiCryptoCollector(KeyCacheKms(), KeyCache(), dsn=f"postgresql://nobody@127.0.0.1:{port}/none")
    _, samples = scrape(collector)
    assert value(samples, "owui_crypto_db_stats_up") == 0
    assert value(samples, "owui_crypto_key_cache_hits_total") == 0


# -- the exporter ------------------------------------------------------------------------------------


def test_exporter_serves_the_text_format_on_a_free_loopback_port(kms_settings: Settings) -> None:
    with KmsKeys(kms_settings) as keys:
        keys.user_id("alice@example.com")
        exporter = serve_metrics(OwuiCryptoCollector(keys, KeyCache()), "127.0.0.1", 0)
        try:
            assert exporter.server.server_address[0] == "127.0.0.1" and exporter.port > 0
            assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
            with urllib.request.urlopen(exporter.url, timeout=5) as response:
                content_type = response.headers["Content-Type"]
                text = response.read().decode()
        finally:
            exporter.close()
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["owui_crypto_kms_requests"].type == "counter"
    assert families["owui_crypto_kms_request_duration_seconds"].type == "histogram"
    assert families["owui_crypto_key_cache_entries"].type == "gauge"
    assert "process_resident_memory_bytes" in families  # the process's own, from prometheus_client
    assert 'owui_crypto_kms_requests_total{operation="GenerateMac"} 1.0' in text
    with pytest.raises(OSError):
        urllib.request.urlopen(exporter.url, timeout=2)  # closed means closed


def test_exporter_refuses_a_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(errors.ConfigError, match=rf"OWUI_CRYPTO_METRICS_PORT: cannot listen on 127.0.0.1:{port}"):
            serve_metrics(OwuiCryptoCollector(KeyCacheKms(), KeyCache()), "127.0.0.1", port)


def test_serve_starts_the_exporter_only_when_asked(kms_server: KmsServer, db_url: str) -> None:
    off = kms_server.settings()
    assert metrics.start(off, KeyService(off, db_url)) is None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    on = kms_server.settings(metrics_port=port)
    keys = KeyService(on, db_url)
    exporter = metrics.start(on, keys)
    assert exporter is not None
    try:
        assert exporter.url == f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(exporter.url, timeout=5) as response:
            text = response.read().decode()
        assert "owui_crypto_key_cache_capacity 10000.0" in text
        assert "owui_crypto_db_stats_up 1.0" in text
    finally:
        exporter.close()
        keys.kms.close()


@pytest.mark.parametrize(("given", "host", "port"), [
    ("9464", "127.0.0.1", 9464),
    (" 9464 ", "127.0.0.1", 9464),
    ("0.0.0.0:9100", "0.0.0.0", 9100),
    ("[::1]:9464", "::1", 9464),
])
def test_metrics_address_setting(given: str, host: str, port: int) -> None:
    settings = Settings.from_env({"AWS_REGION": "us-east-1", "KMS_HMAC_KEY_ID": "alias/h",
                                  "KMS_APPLICATION_CMK_ID": "alias/c", "OWUI_CRYPTO_METRICS_PORT": given})
    assert (settings.metrics_host, settings.metrics_port) == (host, port)


@pytest.mark.parametrize("given", ["localhost:9464", "metrics", "0", "70000", "1.2.3:9464", "9464:"])
def test_metrics_address_setting_refuses_what_it_cannot_bind_exactly(given: str) -> None:
    with pytest.raises(errors.ConfigError, match="OWUI_CRYPTO_METRICS_PORT"):
        Settings.from_env({"AWS_REGION": "us-east-1", "KMS_HMAC_KEY_ID": "alias/h",
                           "KMS_APPLICATION_CMK_ID": "alias/c", "OWUI_CRYPTO_METRICS_PORT": given})


def test_metrics_are_off_by_default() -> None:
    settings = Settings.from_env({"AWS_REGION": "us-east-1", "KMS_HMAC_KEY_ID": "alias/h",
                                  "KMS_APPLICATION_CMK_ID": "alias/c"})
    assert settings.metrics_port is None and settings.metrics_host == "127.0.0.1"


# -- alert rules and dashboard query what is exported ----------------------------------------------------


class FakeAdapter:
    def metrics(self) -> dict[str, int]:
        return {"transactions": 0, "activations": 0, "round_trips": 0, "transport_renewals": 0}


@pytest.fixture
def exported(db_url: str, kms_settings: Settings) -> set[str]:
    """Every sample name a fully attached exporter serves, database statistics included."""
    with KmsKeys(kms_settings) as keys:
        collector = OwuiCryptoCollector(keys, KeyCache(), cache_capacity=1, dsn=with_track_functions(db_url))
        collector.attach(FakeAdapter(), dict)
        _, samples = scrape(collector)
    return {name for name, _ in samples}


def queried_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bowui_crypto_\w+", expr))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_are_well_formed_and_query_exported_metrics(exported: set[str]) -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names))
    rules = alert_rules()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"OwuiCrypto[A-Za-z]+", rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0m"))
        used = queried_metrics(rule["expr"])
        assert used and used <= exported, (rule["alert"], used - exported)
    covered = " ".join(rule["expr"] for rule in rules)
    for needed in ("owui_crypto_kms_errors_total", "owui_crypto_kms_throttled_answers_total",
                   "owui_crypto_refusals_total", "owui_crypto_key_cache_hits_total"):
        assert needed in covered


def test_dashboard_queries_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "owui-crypto"
    targets = [target for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(targets) >= 9
    for target in targets:
        used = queried_metrics(target["expr"])
        assert used and used <= exported, (target["expr"], used - exported)
        assert 'instance=~"$instance"' in target["expr"]
        assert target["datasource"]["uid"] == "${datasource}"


def dashboard_as_recording_rules(path: Path) -> None:
    """Every dashboard query as a recording rule, Grafana's variables replaced, so promtool parses the PromQL."""
    rules = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace('"$instance"', '".*"')
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId'].lower()}", "expr": expr})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))


def test_promtool_checks_the_rules_and_the_dashboards_promql(tmp_path: Path) -> None:
    assert PROMTOOL is not None, "promtool is missing: make test installs Debian's prometheus (scripts/services.sh)"
    checked = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    dashboard_rules = tmp_path / "dashboard-rules.yml"
    dashboard_as_recording_rules(dashboard_rules)
    checked = subprocess.run([PROMTOOL, "check", "rules", str(dashboard_rules)], capture_output=True, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    shown = ", ".join(f'{k}="{v}"' for k, v in {"instance": "task-1", **labels}.items())
    return {"series": f"{name}{{{shown}}}", "values": values}


def fires(alert: str, at: str, **labels: str) -> dict[str, Any]:
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}[alert]
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": {"severity": severity, "instance": "task-1", **labels}}]}


def silent(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


# Synthetic series, one minute apart, and what each alert must make of them.
ALERT_CASES: list[dict[str, Any]] = [
    {"input_series": [series("owui_crypto_kms_errors_total", "0 0 1 1 1 1 1 1 1 1 1 1",
                             operation="Decrypt", error="KeyUnavailable")],
     "alert_rule_test": [silent("OwuiCryptoKmsKeyUnavailable", "1m"),
                         fires("OwuiCryptoKmsKeyUnavailable", "3m", operation="Decrypt"),
                         silent("OwuiCryptoKmsKeyUnavailable", "11m"),
                         silent("OwuiCryptoKmsErrors", "5m")]},
    {"input_series": [series("owui_crypto_kms_errors_total", "0+1x20", operation="Decrypt", error="KmsUnreachable")],
     "alert_rule_test": [silent("OwuiCryptoKmsErrors", "4m"),
                         fires("OwuiCryptoKmsErrors", "10m", operation="Decrypt", error="KmsUnreachable")]},
    {"input_series": [series("owui_crypto_kms_errors_total", "0 1 1 1", operation="Decrypt", error="CannotUnwrap")],
     "alert_rule_test": [fires("OwuiCryptoKmsCannotUnwrap", "2m"), silent("OwuiCryptoKmsErrors", "3m")]},
    {"input_series": [series("owui_crypto_kms_throttled_answers_total", "0+3x30", operation="Decrypt"),
                      series("owui_crypto_kms_errors_total", "0x30", operation="Decrypt", error="KmsThrottled")],
     "alert_rule_test": [silent("OwuiCryptoKmsThrottling", "5m"),
                         fires("OwuiCryptoKmsThrottling", "15m", operation="Decrypt"),
                         silent("OwuiCryptoKmsThrottledFailures", "15m")]},
    {"input_series": [series("owui_crypto_kms_errors_total", "0 0 2 2 2", operation="GenerateMac",
                             error="KmsThrottled")],
     "alert_rule_test": [fires("OwuiCryptoKmsThrottledFailures", "3m", operation="GenerateMac")]},
    {"input_series": [series("owui_crypto_kms_request_duration_seconds_bucket", "0+10x30", operation="Decrypt",
                             le="0.5"),
                      series("owui_crypto_kms_request_duration_seconds_bucket", "0+20x30", operation="Decrypt",
                             le="1"),
                      series("owui_crypto_kms_request_duration_seconds_bucket", "0+20x30", operation="Decrypt",
                             le="+Inf")],
     "alert_rule_test": [silent("OwuiCryptoKmsSlow", "5m"),
                         fires("OwuiCryptoKmsSlow", "20m", operation="Decrypt")]},
    # Half the lookups miss, 10 misses a minute: low. Then 1 miss a minute against 100 hits: fine.
    {"input_series": [series("owui_crypto_key_cache_hits_total", "0+10x40"),
                      series("owui_crypto_key_cache_misses_total", "0+10x40")],
     "alert_rule_test": [silent("OwuiCryptoKeyCacheHitRatioLow", "10m"),
                         fires("OwuiCryptoKeyCacheHitRatioLow", "35m")]},
    {"input_series": [series("owui_crypto_key_cache_hits_total", "0+100x40"),
                      series("owui_crypto_key_cache_misses_total", "0+1x40")],
     "alert_rule_test": [silent("OwuiCryptoKeyCacheHitRatioLow", "35m")]},
    # Two misses an hour, all misses: too few to matter.
    {"input_series": [series("owui_crypto_key_cache_hits_total", "0x60"),
                      series("owui_crypto_key_cache_misses_total", "0+0.03x60")],
     "alert_rule_test": [silent("OwuiCryptoKeyCacheHitRatioLow", "50m")]},
    {"input_series": [series("owui_crypto_key_cache_evictions_total", "0+2x40")],
     "alert_rule_test": [fires("OwuiCryptoKeyCacheFull", "30m")]},
    # A quiet hour of OC002 (an admin now and then), then 30 a minute.
    {"input_series": [series("owui_crypto_refusals_total", "0+0.05x60 3+30x15", sqlstate="OC002")],
     "alert_rule_test": [silent("OwuiCryptoRefusalSpike", "55m"),
                         fires("OwuiCryptoRefusalSpike", "70m", sqlstate="OC002")]},
    {"input_series": [series("owui_crypto_refusals_total", "0+0.5x60", sqlstate="OC002")],
     "alert_rule_test": [silent("OwuiCryptoRefusalSpike", "55m")]},
    {"input_series": [series("owui_crypto_refusals_total", "0 0 1 1", sqlstate="OC003"),
                      series("owui_crypto_refusals_total", "0 0 1 1", sqlstate="OC004")],
     "alert_rule_test": [fires("OwuiCryptoIntegrityFailure", "3m"), fires("OwuiCryptoTransportRefused", "3m")]},
    {"input_series": [series("owui_crypto_db_stats_up", "0x30")],
     "alert_rule_test": [fires("OwuiCryptoDatabaseStatsUnavailable", "20m")]},
]


def test_promtool_every_alert_fires_on_its_trouble_and_only_then(tmp_path: Path) -> None:
    """The alerts' logic, on a copy without annotations (promtool compares rendered annotations exactly; their
    templates are checked above), plus one alert with its annotations rendered from the file as shipped."""
    assert PROMTOOL is not None, "promtool is missing: make test installs Debian's prometheus (scripts/services.sh)"
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    bare = tmp_path / "alerts-logic.yml"
    bare.write_text(yaml.safe_dump(document))
    tested = {case["alert_rule_test"][i]["alertname"] for case in ALERT_CASES
              for i in range(len(case["alert_rule_test"])) if case["alert_rule_test"][i]["exp_alerts"]}
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a case where it fires"
    logic = {"rule_files": [str(bare)], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", **case} for case in ALERT_CASES]}
    rendered_case = {"interval": "1m", "input_series": ALERT_CASES[0]["input_series"], "alert_rule_test": [{
        "eval_time": "3m", "alertname": "OwuiCryptoKmsKeyUnavailable", "exp_alerts": [{
            "exp_labels": {"severity": "critical", "instance": "task-1", "operation": "Decrypt"},
            "exp_annotations": {
                "summary": "KMS refuses owui-crypto's key (Decrypt)",
                "description": "task-1: 1 KMS Decrypt call(s) failed with KeyUnavailable in 5 minutes: a key is "
                               "disabled or pending deletion, or the task role lost its permission. Run "
                               "`owui-crypto doctor`."}}]}]}
    shipped = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [rendered_case]}
    for name, tests in (("logic", logic), ("shipped", shipped)):
        path = tmp_path / f"{name}-test.yml"
        path.write_text(yaml.safe_dump(tests))
        result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, result.stdout + result.stderr


# -- CloudTrail: every KMS request names its owner ---------------------------------------------------------
#
# CloudTrail records a request's encryption context in plaintext (requestParameters.encryptionContext), so a
# context naming the user or the deployment key makes every Decrypt of a user's key attributable in the trail.
# KMS takes a context only on cryptographic operations with a symmetric key: GenerateMac (an HMAC key) and
# DescribeKey have no such parameter in the API, so their trail entries name only the key.

_CONTEXT_MEMBERS = ("EncryptionContext", "SourceEncryptionContext", "DestinationEncryptionContext")


def kms_model() -> Any:
    return botocore.session.get_session().get_service_model("kms")


def called_operations() -> set[str]:
    """Every KMS operation kms.py calls: the keys of its ``_*SNAKE_CASE`` maps."""
    return {op for name, table in vars(kms).items() if name.endswith("SNAKE_CASE") and isinstance(table, dict)
            for op in table}


def context_members(operation: str) -> list[str]:
    members = kms_model().operation_model(operation).input_shape.members
    return [m for m in _CONTEXT_MEMBERS if m in members]


def check_context(context: dict[str, str]) -> None:
    assert context["application"] == kms.APPLICATION
    if context["purpose"] == "user-dek-encryption":
        assert set(context) == {"application", "purpose", "user_id"} and context["user_id"]
    else:
        assert context["purpose"] == "deployment-key"
        assert set(context) == {"application", "purpose", "name"} and context["name"]


def test_generate_mac_and_describe_key_have_no_encryption_context_in_kms() -> None:
    for operation in ("GenerateMac", "DescribeKey"):
        assert context_members(operation) == [], operation
    for operation in ("GenerateDataKey", "Encrypt", "Decrypt"):
        assert context_members(operation) == ["EncryptionContext"]


def test_every_kms_call_site_passes_an_encryption_context_where_kms_takes_one() -> None:
    """Statically, over kms.py: each call of a KMS operation that takes a context passes every context member."""
    tree = ast.parse((REPO / "app_adapter" / "kms.py").read_text())
    sites: dict[str, int] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("_") and node.func.attr.endswith("call") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            continue
        operation = node.args[0].value
        if operation not in called_operations():
            continue
        sites[operation] = sites.get(operation, 0) + 1
        passed = {k.arg for k in node.keywords}
        missing = [m for m in context_members(operation) if m not in passed]
        assert not missing, f"kms.py line {node.lineno}: {operation} without {missing}"
    assert {"GenerateDataKey", "Encrypt", "Decrypt", "ReEncrypt"} <= set(sites)


def test_every_kms_request_carries_the_owners_encryption_context(kms_server: KmsServer,
                                                                  kms_settings: Settings) -> None:
    """On the wire (moto over HTTP), through every public method of KmsKeys that reaches a keyed operation."""
    sent: list[tuple[str, dict[str, Any]]] = []
    with KmsKeys(kms_settings) as keys:
        def note(params: dict[str, Any], model: Any, **_: Any) -> None:
            sent.append((model.name, json.loads(params["body"])))

        keys.client.meta.events.register("before-call.kms", note)
        keys.check_keys()
        keys.user_id("alice@example.com")
        dek, blob = keys.new_dek("user-a")
        keys.unwrap_dek("user-a", keys.wrap_dek("user-a", dek))
        keys.unwrap_dek("user-a", blob)
        shared = keys.wrap_deployment_key("share", os.urandom(32))
        keys.unwrap_deployment_key("share", shared)
        keys.reencrypt_dek("user-a", blob, kms_server.cmk_id)
        keys.reencrypt_deployment_key("share", shared, kms_server.cmk_id)
    seen = {operation for operation, _ in sent}
    keyed = {operation for operation in called_operations() if context_members(operation)}
    assert keyed <= seen, f"exercise these here: {keyed - seen}"
    for operation, body in sent:
        for member in context_members(operation):
            check_context(body[member])
    assert {operation for operation, body in sent if not context_members(operation)} == \
        {"DescribeKey", "GenerateMac"}

