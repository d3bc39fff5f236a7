"""The soak report's arithmetic (scripts/soak_report.py), on synthetic events: what counts in which fault's row,
when a fault has recovered, and which errors no fault explains (the soak fails on those).

Runs in .venv, which has no matplotlib: only the pure part is exercised here; the PNG is drawn by the soak itself.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from scripts import soak_report as sr

GRACE = 10.0


def ev(t: float, status: int, ms: float = 50.0, instance: str = "a") -> object:
    return sr.Event(t, ms, "u01", instance, "get_chat", status, "" if status < 300 else "HTTPStatusError")


def test_the_arithmetic_needs_no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it now fails
    monkeypatch.delitem(sys.modules, "scripts.soak_report")
    module = importlib.import_module("scripts.soak_report")
    assert module.fault_rows([ev(1, 503)], [module.Fault("kms_down", 0.0, 2.0)], GRACE)[0].server_5xx == 1


def test_rows_count_each_class_inside_the_window_with_grace() -> None:
    fault = sr.Fault("kms_down", 100.0, 130.0)
    events = [ev(90, 200),                      # before: outside
              ev(99.99, 503, ms=20),            # started before, still running at the start: inside
              ev(100, 200), ev(110, 404), ev(120, 503), ev(125, 0),
              ev(135, 503),                     # after the end, within grace: inside, sets recovery
              ev(140, 200),                     # the last instant of the grace window: inside
              ev(141, 200)]                     # outside
    [row] = sr.fault_rows(events, [fault], GRACE)
    assert (row.requests, row.ok_2xx, row.client_4xx, row.server_5xx, row.no_answer) == (7, 2, 1, 3, 1)
    assert row.recovered_after_s == pytest.approx(5.0)
    assert sr.unexplained_errors(events, [fault], GRACE) == []
    outside = sr.outside_counts(events, [fault], GRACE)
    assert (outside.requests, outside.ok_2xx) == (2, 2)
    assert sr.total_counts(events).requests == 9


def test_recovery_is_zero_when_no_error_follows_the_end() -> None:
    fault = sr.Fault("pg_restart", 10.0, 20.0)
    [row] = sr.fault_rows([ev(12, 0), ev(19.5, 503), ev(22, 200)], [fault], GRACE)
    assert row.recovered_after_s == 0.0
    [quiet] = sr.fault_rows([ev(12, 200)], [fault], GRACE)
    assert quiet.recovered_after_s == 0.0 and quiet.server_5xx == 0


def test_errors_past_the_grace_are_unexplained_and_the_fault_did_not_recover() -> None:
    fault = sr.Fault("serve_kill", 10.0, 20.0)
    events = [ev(15, 0), ev(29, 503), ev(31, 503, instance="b"), ev(60, 500)]
    [row] = sr.fault_rows(events, [fault], GRACE)
    assert row.recovered_after_s is None
    unexplained = sr.unexplained_errors(events, [fault], GRACE)
    assert [(e["t"], e["status"], e["instance"]) for e in unexplained] == [(31, 503, "b"), (60, 500, "a")]


def test_an_error_explained_by_the_next_fault_is_no_failure_to_recover() -> None:
    first, second = sr.Fault("kms_down", 10.0, 20.0), sr.Fault("pg_restart", 31.0, 35.0)
    events = [ev(18, 503), ev(32, 0)]
    rows = sr.fault_rows(events, [first, second], GRACE)
    assert rows[0].recovered_after_s == 0.0
    assert rows[1].recovered_after_s == 0.0 and rows[1].no_answer == 1
    assert sr.unexplained_errors(events, [first, second], GRACE) == []


def test_a_request_in_overlapping_windows_counts_for_the_latest_fault_only() -> None:
    faults = [sr.Fault("hostile", 0.0, 50.0), sr.Fault("kms_down", 60.0, 90.0)]
    events = [ev(45, 413), ev(70, 503), ev(75, 200), ev(200, 200)]  # 70 and 75: in hostile's grace and kms_down
    rows = sr.fault_rows(events, faults, GRACE)
    assert [(r.requests, r.client_4xx, r.server_5xx) for r in rows] == [(1, 1, 0), (2, 0, 1)]
    assert sr.outside_counts(events, faults, GRACE).requests == 1
    assert sum(r.requests for r in rows) + 1 == sr.total_counts(events).requests


def test_4xx_outside_faults_is_not_an_error() -> None:
    assert sr.unexplained_errors([ev(5, 400), ev(6, 422), ev(7, 200)], [], GRACE) == []


def test_percentile_and_buckets() -> None:
    assert sr.percentile([], 50) != sr.percentile([], 50)  # NaN
    values = sorted(float(v) for v in range(1, 101))
    assert (sr.percentile(values, 50), sr.percentile(values, 95), sr.percentile(values, 99)) == (50.0, 95.0, 99.0)
    events = [ev(0.5, 200, ms=10), ev(0.7, 200, ms=30), ev(1.2, 0, ms=5000), ev(1.4, 404, ms=20)]
    b = sr.buckets(events, 1.0, 2.0)
    assert [x.requests for x in b] == [2, 2]
    assert b[0].p50 == 10 and b[0].p99 == 30 and b[0].error_pct == 0
    assert b[1].p50 == 20  # the unanswered request has no latency
    assert b[1].error_pct == 50 and b[1].client_pct == 50
    assert sr.bucket_width(60) == 1 and sr.bucket_width(900) == 10


def test_files_and_markdown(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(e.as_dict()) for e in [ev(1, 200), ev(12, 503), ev(70, 502)]) + "\n")
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"name": "kms_down", "start": 10, "end": 20, "detail": "refused"}]))
    evs, fts = sr.load_events(events), sr.load_faults(faults)
    rows = sr.fault_rows(evs, fts, GRACE)
    unexplained = sr.unexplained_errors(evs, fts, GRACE)
    text = sr.markdown(rows, sr.outside_counts(evs, fts, GRACE), sr.total_counts(evs), unexplained, GRACE, "x.png")
    assert "| kms_down | 10-20 | 1 | 0 | 0 | 1 | 0 | 0.0 s |" in text
    assert "| outside faults | | 2 | 1 | 0 | 1 | 0 | |" in text
    assert "| **total** | | 3 | 1 | 0 | 2 | 0 | |" in text
    assert "**1**" in text and "| 70.0 | a | u01 | get_chat | 502 | HTTPStatusError |" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        sr.load_events(bad)


def test_errors_of_a_later_fault_in_the_grace_of_an_earlier_one_are_the_later_ones() -> None:
    early, late = sr.Fault("terminate_backends", 10.0, 11.0), sr.Fault("serve_kill", 15.0, 40.0)
    events = [ev(10.5, 0), ev(12, 503), ev(16, 0), ev(20, 0), ev(38, 0)]
    rows = sr.fault_rows(events, [early, late], GRACE)
    assert rows[0].no_answer == 1 and rows[0].recovered_after_s == pytest.approx(1.0)  # 12 s, not 20 s
    assert rows[1].no_answer == 3 and rows[1].recovered_after_s == 0.0
