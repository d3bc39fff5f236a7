#!/usr/bin/env python3
"""The soak's report (issue 12): a table per fault and a PNG timeline, from what the load recorded.

Inputs (written by scripts/soak.py):

* EVENTS, JSON Lines, one object per HTTP request or socket.io exchange:
  ``{"t": seconds since the load started (the request's start), "ms": duration, "user", "instance",
  "action", "status": HTTP status or 0 for no answer, "detail": short reason, no user text}``
* FAULTS, a JSON list of ``{"name", "start", "end", "detail"}`` windows, in the same clock.

What counts where, and why:

* A fault *explains* an error (5xx, or no answer) if the request's time span ``[t, t + ms]`` overlaps the fault's
  window ``[start, end + grace_s]``. The span, not the start alone: a request sent just before PostgreSQL
  restarts fails because of the restart. Errors no window explains are ``unexplained``; the soak fails on any.
* A fault's row counts the requests it is the latest fault for: of the windows a request's span overlaps, the one
  that started last (the KMS outage, not the hostile inputs whose grace it falls in). So each request counts in one
  row at most, the "outside faults" row counts the rest, and the rows add up to the "total" row.
* ``recovered_after_s``: seconds from the fault's end to the start of the last error its window explains, 0.0 when
  none started after the end, and None when the errors went on past ``end + grace_s``: an error that no other
  window explains started in ``(end + grace_s, end + 2 * grace_s]``, i.e. right where this fault's grace ran out.
  An error in this fault's grace that falls inside a later fault's own ``[start, end]`` is that fault's, not a
  sign that this one has not recovered.
* 2xx and 3xx are "ok" (Open WebUI's API answers no 3xx to the soak's requests; a redirect is no error).
* Latency percentiles are over answered requests only: a refused connection says nothing of latency and a timeout
  would only show the client's limit.

The arithmetic (rows, unexplained, buckets) is pure Python; matplotlib is imported only to draw the PNG, so the
unit test (tests/test_soak_report.py) runs in .venv, which has no matplotlib.

Also runnable: ``python scripts/soak_report.py EVENTS FAULTS OUTDIR [--grace S]`` writes OUTDIR/soak-report.md and
OUTDIR/soak-timeline.png, prints the table and the PNG's path, and exits 1 when some error is unexplained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKDOWN_NAME = "soak-report.md"
PNG_NAME = "soak-timeline.png"
#: At most this many unexplained errors are listed in the Markdown (all are in Report.unexplained).
LISTED_UNEXPLAINED = 20


@dataclass(frozen=True)
class Event:
    t: float
    ms: float
    user: str
    instance: str
    action: str
    status: int
    detail: str

    @property
    def end(self) -> float:
        return self.t + max(self.ms, 0.0) / 1000.0

    @property
    def error(self) -> bool:
        """A 5xx or no answer at all: what a fault may explain and nothing else may cause."""
        return self.status == 0 or self.status >= 500

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, "ms": self.ms, "user": self.user, "instance": self.instance, "action": self.action,
                "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class Fault:
    name: str
    start: float
    end: float
    detail: str = ""


@dataclass
class Counts:
    requests: int = 0
    ok_2xx: int = 0
    client_4xx: int = 0
    server_5xx: int = 0
    no_answer: int = 0

    def add(self, event: Event) -> None:
        self.requests += 1
        if event.status == 0:
            self.no_answer += 1
        elif event.status >= 500:
            self.server_5xx += 1
        elif event.status >= 400:
            self.client_4xx += 1
        else:
            self.ok_2xx += 1


@dataclass
class FaultRow:
    name: str
    start: float
    end: float
    requests: int
    ok_2xx: int
    client_4xx: int
    server_5xx: int
    no_answer: int
    recovered_after_s: float | None


@dataclass
class Report:
    markdown: str
    png: Path
    rows: list[FaultRow]
    unexplained: list[dict[str, Any]]


# -- reading ------------------------------------------------------------------------------------------------------

def load_events(path: Path) -> list[Event]:
    events = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                events.append(Event(float(raw["t"]), float(raw.get("ms") or 0.0), str(raw.get("user", "")),
                                    str(raw.get("instance", "")), str(raw.get("action", "")), int(raw["status"]),
                                    str(raw.get("detail", ""))))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not an event ({type(exc).__name__})") from exc
    events.sort(key=lambda e: e.t)
    return events


def load_faults(path: Path) -> list[Fault]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: a JSON list of fault windows expected")
    return [Fault(str(f["name"]), float(f["start"]), float(f["end"]), str(f.get("detail", ""))) for f in raw]


# -- the arithmetic (pure) ----------------------------------------------------------------------------------------

def _overlaps(event: Event, lo: float, hi: float) -> bool:
    return event.t <= hi and event.end >= lo


def explained_by(event: Event, faults: Sequence[Fault], grace_s: float) -> list[Fault]:
    return [f for f in faults if _overlaps(event, f.start, f.end + grace_s)]


def latest_fault(event: Event, faults: Sequence[Fault], grace_s: float) -> Fault | None:
    """The fault whose row counts ``event``: of the windows its span overlaps, the one that started last."""
    return max(explained_by(event, faults, grace_s), key=lambda f: f.start, default=None)


def fault_rows(events: Sequence[Event], faults: Sequence[Fault], grace_s: float) -> list[FaultRow]:
    rows = []
    for fault in faults:
        counts = Counts()
        last_error: float | None = None
        # Faults that begin after this one ended take over the errors of their own window from its grace.
        later = [f for f in faults if f is not fault and f.start > fault.end]
        for event in events:
            if latest_fault(event, faults, grace_s) is fault:
                counts.add(event)
            taken_over = event.t > fault.end and any(_overlaps(event, f.start, f.end) for f in later)
            if event.error and _overlaps(event, fault.start, fault.end + grace_s) and not taken_over:
                last_error = event.t if last_error is None else max(last_error, event.t)
        spilled = any(e.error and fault.end + grace_s < e.t <= fault.end + 2 * grace_s
                      and not explained_by(e, faults, grace_s) for e in events)
        recovered: float | None
        if spilled:
            recovered = None
        elif last_error is None or last_error <= fault.end:
            recovered = 0.0
        else:
            recovered = last_error - fault.end
        rows.append(FaultRow(fault.name, fault.start, fault.end, counts.requests, counts.ok_2xx, counts.client_4xx,
                             counts.server_5xx, counts.no_answer, recovered))
    return rows


def unexplained_errors(events: Sequence[Event], faults: Sequence[Fault], grace_s: float) -> list[dict[str, Any]]:
    return [e.as_dict() for e in events if e.error and not explained_by(e, faults, grace_s)]


def outside_counts(events: Sequence[Event], faults: Sequence[Fault], grace_s: float) -> Counts:
    counts = Counts()
    for event in events:
        if not explained_by(event, faults, grace_s):
            counts.add(event)
    return counts


def total_counts(events: Iterable[Event]) -> Counts:
    counts = Counts()
    for event in events:
        counts.add(event)
    return counts


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q % of the values at or below it."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def bucket_width(duration_s: float) -> float:
    """About 120 buckets over the run, at a round width of at least a second."""
    for width in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if duration_s / width <= 150:
            return float(width)
    return 600.0


@dataclass
class Bucket:
    start: float
    requests: int
    p50: float
    p95: float
    p99: float
    error_pct: float  # 5xx + no answer, of all requests started in the bucket
    client_pct: float  # 4xx


def buckets(events: Sequence[Event], width: float, until: float) -> list[Bucket]:
    n = max(1, math.ceil(until / width))
    latencies: list[list[float]] = [[] for _ in range(n)]
    totals = [Counts() for _ in range(n)]
    for event in events:
        i = min(n - 1, max(0, int(event.t // width)))
        totals[i].add(event)
        if event.status != 0:
            latencies[i].append(event.ms)
    out = []
    for i in range(n):
        lat = sorted(latencies[i])
        c = totals[i]
        share = 100.0 / c.requests if c.requests else math.nan
        out.append(Bucket(i * width, c.requests, percentile(lat, 50), percentile(lat, 95), percentile(lat, 99),
                          (c.server_5xx + c.no_answer) * share, c.client_4xx * share))
    return out


# -- Markdown -----------------------------------------------------------------------------------------------------

def _recovered(value: float | None) -> str:
    return "not within grace" if value is None else f"{value:.1f} s"


def markdown(rows: Sequence[FaultRow], outside: Counts, total: Counts, unexplained: Sequence[dict[str, Any]],
             grace_s: float, png_name: str) -> str:
    lines = [f"| fault | window (s) | requests | 2xx | 4xx | 5xx | no answer | recovered after "
             f"(grace {grace_s:g} s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.start:.0f}-{r.end:.0f} | {r.requests} | {r.ok_2xx} | {r.client_4xx} | "
                     f"{r.server_5xx} | {r.no_answer} | {_recovered(r.recovered_after_s)} |")
    for label, c in (("outside faults", outside), ("**total**", total)):
        lines.append(f"| {label} | | {c.requests} | {c.ok_2xx} | {c.client_4xx} | {c.server_5xx} | {c.no_answer} | |")
    lines.append("")
    lines.append(f"Unexplained errors (5xx or no answer outside every fault window + {grace_s:g} s): "
                 f"**{len(unexplained)}**.")
    if unexplained:
        lines += ["", "| t (s) | instance | user | action | status | detail |", "|---:|---|---|---|---:|---|"]
        for e in unexplained[:LISTED_UNEXPLAINED]:
            detail = str(e.get("detail", "")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {e['t']:.1f} | {e['instance']} | {e['user']} | {e['action']} | {e['status']} | "
                         f"{detail} |")
        if len(unexplained) > LISTED_UNEXPLAINED:
            lines.append(f"| ... | {len(unexplained) - LISTED_UNEXPLAINED} more | | | | |")
    lines += ["", f"![soak timeline]({png_name})", ""]
    return "\n".join(lines)


# -- the PNG ------------------------------------------------------------------------------------------------------

def draw_timeline(events: Sequence[Event], faults: Sequence[Fault], png: Path, grace_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; and set before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    until = max([e.end for e in events] + [f.end + grace_s for f in faults] + [1.0])
    width = bucket_width(until)
    rows = buckets(events, width, until)
    mid = [b.start + width / 2 for b in rows]

    fig, (lat_ax, rate_ax, err_ax) = plt.subplots(3, 1, figsize=(13, 8.5), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 1.3, 2]})
    for label, key, style in (("p50", "p50", "-"), ("p95", "p95", "--"), ("p99", "p99", ":")):
        lat_ax.plot(mid, [getattr(b, key) for b in rows], style, linewidth=1.4, label=label)
    lat_ax.set_yscale("log")
    lat_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    lat_ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    lat_ax.tick_params(axis="y", which="minor", labelsize=7)
    lat_ax.set_ylabel("latency (ms, log)")
    lat_ax.legend(loc="upper left", fontsize=8, ncol=3)
    rate_ax.bar(mid, [b.requests / width for b in rows], width=width * 0.9, color="0.55")
    rate_ax.set_ylabel("requests/s")
    err_ax.plot(mid, [b.error_pct for b in rows], color="tab:red", linewidth=1.6, label="5xx + no answer")
    err_ax.plot(mid, [b.client_pct for b in rows], color="tab:orange", linewidth=1.0, label="4xx")
    err_ax.set_ylabel(f"% of requests\n(per {width:g} s)")
    unexplained = [e.t for e in events if e.error and not explained_by(e, faults, grace_s)]
    if unexplained:
        err_ax.plot(unexplained, [0] * len(unexplained), "kx", markersize=7, clip_on=False,
                    label=f"unexplained ({len(unexplained)})")
    err_ax.set_ylim(bottom=0)
    err_ax.set_xlabel("seconds since the load started")
    err_ax.legend(loc="upper left", fontsize=8, ncol=3)

    cmap = plt.get_cmap("tab10")
    colours: dict[str, Any] = {}
    for i, fault in enumerate(sorted(faults, key=lambda f: f.start)):
        colour = colours.setdefault(fault.name, cmap(len(colours) % 10))
        for ax in (lat_ax, rate_ax, err_ax):
            ax.axvspan(fault.start, max(fault.end, fault.start + width / 4), color=colour, alpha=0.18, linewidth=0)
            ax.axvspan(fault.end, fault.end + grace_s, color=colour, alpha=0.06, linewidth=0)
        # labels in four staggered rows above the plot, so neighbouring windows do not overwrite each other
        lat_ax.annotate(fault.name, xy=(fault.start, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, 4 + 11 * (i % 4)), textcoords="offset points", fontsize=8, color=colour,
                        fontweight="bold", annotation_clip=False)
    for ax in (lat_ax, rate_ax, err_ax):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, until)
    fig.suptitle(f"soak: latency, load and errors over time (fault windows shaded; paler: + {grace_s:g} s grace)",
                 fontsize=11, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png, dpi=110)
    plt.close(fig)


# -- entry points -------------------------------------------------------------------------------------------------

def write_report(events: Path, faults: Path, out_dir: Path, *, grace_s: float = 30.0) -> Report:
    """Reads the two files, writes OUT_DIR/soak-report.md and OUT_DIR/soak-timeline.png, returns both."""
    evs, fts = load_events(events), load_faults(faults)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = fault_rows(evs, fts, grace_s)
    unexplained = unexplained_errors(evs, fts, grace_s)
    png = out_dir / PNG_NAME
    text = markdown(rows, outside_counts(evs, fts, grace_s), total_counts(evs), unexplained, grace_s, png.name)
    draw_timeline(evs, fts, png, grace_s)
    (out_dir / MARKDOWN_NAME).write_text(text, encoding="utf-8")
    return Report(text, png, rows, unexplained)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", type=Path)
    parser.add_argument("faults", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--grace", type=float, default=30.0, help="seconds after a fault that its errors may last")
    args = parser.parse_args(argv)
    report = write_report(args.events, args.faults, args.out_dir, grace_s=args.grace)
    print(report.markdown)
    print(report.png)
    return 1 if report.unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
