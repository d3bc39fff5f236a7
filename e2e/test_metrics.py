"""Monitoring against the real Open WebUI: ``owui-crypto serve`` exports Prometheus metrics on loopback
(``OWUI_CRYPTO_METRICS_PORT``, set by the ``owui`` fixture), and they count what requests did.

Runs last in the session (e2e/conftest.py orders it): it signs in as test_owui.py's admin, as
test_recover.py does, with users of its own.

With ``OWUI_CRYPTO_DASHBOARD_PNG=docs/grafana.png`` it also renders the README's picture of the dashboard:
Debian's Prometheus scrapes the exporter while this module drives traffic, every query of
deploy/grafana-dashboard.json is evaluated by that Prometheus, and the results are drawn as SVG and
photographed by headless Chromium. Grafana itself is not in Debian; the picture says so. The README's picture
ran with ``PGOPTIONS='-c track_functions=pl'`` (libpq hands it to every connection of the server, whose role
is a superuser here), so the database panel has data::

    PGOPTIONS='-c track_functions=pl' OWUI_CRYPTO_DASHBOARD_PNG=docs/grafana.png \
        .venv-owui/bin/python -m pytest e2e/test_metrics.py -m picture
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.conftest import REPO, Owui, free_port
from e2e.owui_api import Chat, User, new_chat, ok
from e2e.test_recover import admin_token, new_user

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(owui: Owui) -> str:
    return f"http://127.0.0.1:{owui.env['OWUI_CRYPTO_METRICS_PORT']}/metrics"


def scrape(owui: Owui) -> tuple[str, Samples]:
    response = httpx.get(metrics_url(owui), timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return response.text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= series)


def first_message_id(client: httpx.Client, chat: Chat) -> str:
    return next(iter(ok(client.get(f"/api/v1/chats/{chat.id}")).json()["chat"]["history"]["messages"]))


def test_serve_exports_kms_cache_activation_and_refusal_counts(owui: Owui) -> None:
    assert f"Prometheus metrics on {metrics_url(owui)}" in owui.log()
    _, before = scrape(owui)
    admin = admin_token(owui)
    user = new_user(owui, admin, "Mia Metrics")  # sign-up: GenerateMac, GenerateDataKey
    with owui.client(user.token) as c:
        chat = new_chat(c, user, "metrics", n_messages=4)  # the first bind: a cache miss, one Decrypt
        for _ in range(5):
            ok(c.get("/api/v1/chats/list"))
            ok(c.get(f"/api/v1/chats/{chat.id}"))
        message_id = first_message_id(c, chat)
    with owui.client(admin) as a:  # a write that needs Mia's key: refused, 403 OC002
        refused = a.post(f"/api/v1/chats/{chat.id}/messages/{message_id}", json={"content": "admin was here"})
    assert refused.status_code == 403 and refused.json()["owui_crypto"] == "OC002", refused.text
    text, after = scrape(owui)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for operation in ("GenerateMac", "GenerateDataKey", "Decrypt"):
        assert grew("owui_crypto_kms_requests_total", operation=operation) >= 1, operation
        assert grew("owui_crypto_kms_request_duration_seconds_count", operation=operation) >= 1, operation
    assert total(after, "owui_crypto_kms_requests_total", operation="DescribeKey") >= 2  # check_keys at start
    assert grew("owui_crypto_kms_errors_total") == 0
    assert grew("owui_crypto_key_cache_misses_total") >= 1
    assert grew("owui_crypto_key_cache_hits_total") >= 10  # every request binds: 11 of Mia's, the admin's
    assert total(after, "owui_crypto_key_cache_entries") >= 2
    assert grew("owui_crypto_activations_total") >= 11
    assert total(after, "owui_crypto_activation_round_trips_total") >= total(after, "owui_crypto_activations_total")
    assert ("owui_crypto_transport_renewals_total", frozenset()) in after  # 0 without a pooler moving clients
    assert grew("owui_crypto_refusals_total", sqlstate="OC002") == 1
    assert total(after, "process_resident_memory_bytes") > 0
    for secret in (user.id, user.email, admin):
        assert secret not in text  # counts, not people


# -- the README's picture ---------------------------------------------------------------------------------

DASHBOARD_PNG = os.environ.get("OWUI_CRYPTO_DASHBOARD_PNG")
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
SCRAPE_SECONDS = 2
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval would be at this zoom: several scrapes per window
STEP_SECONDS = 5


@contextmanager
def prometheus(target: str, workdir: Path) -> Iterator[str]:
    """Debian's Prometheus on a free loopback port, scraping ``target`` every two seconds; yields its URL."""
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is not installed (Debian: apt-get install prometheus)"
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "scrape_configs": [{"job_name": "owui-crypto", "static_configs": [{"targets": [target]}]}]}))
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


class Traffic:
    """What the picture shows, phase by phase: sign-ups, steady reads, a burst of refusals, wrapped keys that do
    not open, a user deleted. Every request is a real one to Open WebUI."""

    def __init__(self, owui: Owui) -> None:
        self.owui = owui
        self.admin = admin_token(owui)
        self.users: list[User] = []
        self.chats: dict[str, list[Chat]] = {}
        self.phases: list[tuple[float, str]] = []

    def phase(self, name: str) -> None:
        self.phases.append((time.time(), name))

    def sign_up(self, n: int) -> None:
        for i in range(n):
            user = new_user(self.owui, self.admin, f"Dash User{i}")
            self.users.append(user)
            with self.owui.client(user.token) as c:
                self.chats[user.id] = [new_chat(c, user, f"dash {i}.{j}", n_messages=4) for j in range(2)]

    def reads(self, seconds: float, per_second: float = 4.0) -> None:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            user = self.users[i % len(self.users)]
            with self.owui.client(user.token) as c:
                chat = self.chats[user.id][i % 2]
                ok(c.get("/api/v1/chats/list"))
                ok(c.get(f"/api/v1/chats/{chat.id}"))
                if i % 5 == 0:
                    ok(c.get("/api/v1/chats/search", params={"text": "quokka"}))
            i += 1
            time.sleep(max(0.0, 1 / per_second - 0.05))

    def refusals(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self.owui.client(self.admin) as admin:
            while time.monotonic() < deadline:
                for user in self.users:
                    chat = self.chats[user.id][0]
                    with self.owui.client(user.token) as c:
                        message_id = first_message_id(c, chat)
                    refused = admin.post(f"/api/v1/chats/{chat.id}/messages/{message_id}", json={"content": "x"})
                    assert refused.status_code == 403
                time.sleep(0.5)

    def keys_that_do_not_open(self, seconds: float) -> None:
        """A user whose wrapped key was replaced by another user's (as a half-done rewrap or a bad restore
        would leave it): every request of theirs is a KMS Decrypt that fails, CannotUnwrap, answered 500."""
        victim = new_user(self.owui, self.admin, "Cora Corrupt")
        (original,) = self.owui.sql('SELECT kms_encrypted_dek FROM public."user" WHERE id = %s', (victim.id,))[0]
        self.owui.sql('UPDATE public."user" SET kms_encrypted_dek = (SELECT kms_encrypted_dek FROM public."user"'
                      " WHERE id = %s) WHERE id = %s", (self.users[0].id, victim.id))
        try:
            deadline = time.monotonic() + seconds
            with self.owui.client(victim.token) as c:
                while time.monotonic() < deadline:
                    assert c.get("/api/v1/chats/list").status_code >= 500
                    time.sleep(1.0)
        finally:
            self.owui.sql('UPDATE public."user" SET kms_encrypted_dek = %s WHERE id = %s', (original, victim.id))

    def delete_user(self) -> None:
        user = self.users.pop()
        with self.owui.client(self.admin) as admin:
            assert ok(admin.delete(f"/api/v1/users/{user.id}")).json() is True


def query_range(prometheus_url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace('"$instance"', '".*"')
    response = httpx.get(f"{prometheus_url}/api/v1/query_range",
                         params={"query": expr, "start": start, "end": end, "step": STEP_SECONDS}, timeout=30)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


# Grafana's dark theme and its classic palette, so the picture reads like the dashboard it stands for.
COLOURS = ("#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#FF9830", "#96D98D")


def legend(template: str, labels: dict[str, str]) -> str:
    for key, val in labels.items():
        template = template.replace("{{" + key + "}}", val)
    return template


def format_value(v: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{v * 100:.0f}%"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"
    suffix = {"reqps": " req/s", "ops": "/s"}.get(unit, "")
    return f"{v:.4g}{suffix}"


def svg_panel(panel: dict[str, Any], results: list[tuple[str, list[tuple[float, float]]]],
              start: float, end: float) -> str:
    """One time series panel: axes, grid, lines, legend; "No data" when nothing matched, as Grafana shows it."""
    width, height, left, right, top, bottom = 540, 250, 62, 12, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    values = [v for _, points in results for _, v in points if math.isfinite(v)]
    high = max(values, default=0.0)
    if unit == "percentunit" or high <= 0:
        high = 1.0
    else:  # four grid steps of 1, 2, 2.5 or 5 times a power of ten, as Grafana picks them
        magnitude = 10 ** math.floor(math.log10(high / 4))
        high = 4 * next(m * magnitude for m in (1, 2, 2.5, 5, 10) if 4 * m * magnitude >= high)

    def x(t: float) -> float:
        return left + (t - start) / (end - start) * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / high * plot_h

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for i in range(5):
        v = high * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#2c3235"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{html.escape(format_value(v, unit))}'
                     "</text>")
    for i, anchor in enumerate(("start", "middle", "middle", "middle", "end")):
        t = start + (end - start) * i / 4
        label = datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")
        parts.append(f'<text x="{x(t):.1f}" y="{height - 6}" text-anchor="{anchor}">{label}</text>')
    for i, (_, points) in enumerate(results):
        colour = COLOURS[i % len(COLOURS)]
        # A NaN, or a step with no point (a filtered series), breaks the line, as Grafana draws gaps.
        runs: list[list[tuple[float, float]]] = [[]]
        for t, v in points:
            if runs[-1] and (not math.isfinite(v) or t - runs[-1][-1][0] > 1.5 * STEP_SECONDS):
                runs.append([])
            if math.isfinite(v):
                runs[-1].append((t, v))
        for run in runs:
            if not run:
                continue
            line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in run)
            area = f"{x(run[0][0]):.1f},{y(0):.1f} {line} {x(run[-1][0]):.1f},{y(0):.1f}"
            parts.append(f'<polygon points="{area}" fill="{colour}" fill-opacity="0.1"/>')
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    if not results:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" '
                     'class="nodata">No data</text>')
    parts.append("</svg>")
    legends = "".join(f'<span><i style="background:{COLOURS[i % len(COLOURS)]}"></i>{html.escape(name)}</span>'
                      for i, (name, _) in enumerate(results))
    return (f'<div class="panel"><h2>{html.escape(panel["title"])}</h2>{"".join(parts)}'
            f'<div class="legend">{legends}</div></div>')


def render(prometheus_url: str, start: float, end: float, phases: list[tuple[float, str]], out: Path,
           workdir: Path, track_functions: str) -> dict[str, Any]:
    """Evaluate every dashboard query over [start, end] and draw the dashboard; returns what each panel got."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels, got = [], {}
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        results = []
        for target in panel["targets"]:
            for series in query_range(prometheus_url, target["expr"], start, end):
                points = [(float(t), float(v)) for t, v in series["values"]]
                results.append((legend(target["legendFormat"], series["metric"]), points))
        got[panel["title"]] = {name: max((v for _, v in points if math.isfinite(v)), default=None)
                               for name, points in results}
        panels.append(svg_panel(panel, results, start, end))
    span = f"{datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M:%S} to {datetime.fromtimestamp(end, UTC):%H:%M:%S} UTC"
    timeline = " &rarr; ".join(f"{datetime.fromtimestamp(t, UTC):%H:%M:%S} {html.escape(n)}" for t, n in phases)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ background:#111217; color:#ccccdc; font:13px/1.35 "DejaVu Sans", Arial, sans-serif; margin:14px; }}
h1 {{ font-size:18px; font-weight:500; margin:0 0 4px; }}
.note {{ background:#1f2a37; border-left:3px solid #5794F2; padding:6px 10px; margin:6px 0 10px; font-size:12px; }}
.grid {{ display:grid; grid-template-columns:repeat(3, 556px); gap:8px; }}
.panel {{ background:#181b1f; border:1px solid #2c3235; border-radius:3px; padding:6px 8px 6px; }}
h2 {{ font-size:13px; font-weight:500; margin:0 0 2px; }}
svg text {{ fill:#9fa7b3; font-size:10.5px; }} svg text.nodata {{ font-size:14px; fill:#6e7580; }}
.legend {{ font-size:11px; min-height:15px; }} .legend span {{ margin-right:10px; white-space:nowrap; }}
.legend i {{ display:inline-block; width:12px; height:3px; margin:0 4px 3px 0; }}
</style></head><body>
<h1>owui-crypto &middot; {span}</h1>
<div class="note">Not Grafana: a rendering of <b>deploy/grafana-dashboard.json</b>'s queries, each evaluated by
Prometheus 2.42 (Debian) with <code>$__rate_interval</code> = {RATE_INTERVAL} over its {SCRAPE_SECONDS}-second
scrapes of <code>owui-crypto serve</code> during an e2e run (the real Open WebUI 0.12.4, PostgreSQL 15 with
<code>track_functions = {html.escape(track_functions)}</code>, moto as KMS), drawn by e2e/test_metrics.py.<br>
Traffic: {timeline}</div>
<div class="grid">{"".join(panels)}</div></body></html>"""
    page_path = workdir / "dashboard.html"
    page_path.write_text(page, encoding="utf-8")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed (Debian: apt-get install chromium)"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={workdir / 'chromium'}", "--window-size=1716,1090",
                    f"--screenshot={out}", page_path.as_uri()], check=True, capture_output=True, timeout=120)
    assert out.stat().st_size > 10_000
    return got


@pytest.mark.picture
def test_render_the_dashboard_from_a_real_scrape(owui: Owui) -> None:
    assert DASHBOARD_PNG, "set OWUI_CRYPTO_DASHBOARD_PNG=docs/grafana.png: where the picture goes"
    out = Path(DASHBOARD_PNG).resolve()
    target = urllib.parse.urlsplit(metrics_url(owui)).netloc
    with tempfile.TemporaryDirectory(prefix="owui-crypto-dashboard-") as tmp, prometheus(target, Path(tmp)) as url:
        traffic = Traffic(owui)
        time.sleep(10)  # a baseline of scrapes
        start = time.time()
        traffic.phase("sign-ups")
        traffic.sign_up(4)
        traffic.phase("reads")
        traffic.reads(70)
        traffic.phase("refusal burst")
        traffic.refusals(25)
        traffic.phase("reads")
        traffic.reads(20)
        traffic.phase("keys that do not open")
        traffic.keys_that_do_not_open(30)
        traffic.phase("a user deleted, reads")
        traffic.delete_user()
        traffic.reads(30)
        time.sleep(2 * SCRAPE_SECONDS)  # the last scrape
        end = time.time()
        setting = next((dict(labels)["setting"] for name, labels in scrape(owui)[1]
                        if name == "owui_crypto_db_track_functions"), "unknown")
        got = render(url, start, end, traffic.phases, out, Path(tmp), setting)
    summary = json.dumps(got, indent=1, sort_keys=True)
    # The peak of each series, for the README's description of the picture.
    (Path(tempfile.gettempdir()) / "owui-crypto-dashboard-peaks.json").write_text(summary + "\n")
    assert got["KMS requests /s"] and got["Key cache hit ratio"] and got["Refusals /s by SQLSTATE"], summary
