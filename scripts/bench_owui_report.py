"""Statistics, the Markdown table and the PNG of ``make bench-owui``."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

PLAIN, ENC = "plain", "owui-crypto"


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Cell:
    """One request at one size: latencies (s) and CPU (s) per server, paired by repetition."""

    request: str  # "get", "list_page", ...
    label: str  # what the table shows: "GET /api/v1/chats/{id}"
    size: str  # "1000 chats", "200 KiB chat", "10 messages"
    latency: dict[str, list[float]] = field(default_factory=lambda: {PLAIN: [], ENC: []})
    pg_cpu: dict[str, list[float]] = field(default_factory=lambda: {PLAIN: [], ENC: []})
    app_cpu: dict[str, list[float]] = field(default_factory=lambda: {PLAIN: [], ENC: []})
    note: str = ""

    @property
    def n(self) -> int:
        return min(len(self.latency[PLAIN]), len(self.latency[ENC]))

    def median(self, server: str) -> float:
        return statistics.median(self.latency[server]) if self.latency[server] else math.nan

    def p95(self, server: str) -> float:
        return percentile(self.latency[server], 95)

    def ratio(self) -> float:
        """owui-crypto's median over plain Open WebUI's (> 1: slower with owui-crypto)."""
        plain = self.median(PLAIN)
        return self.median(ENC) / plain if plain else math.nan

    def ratio_p95(self) -> float:
        plain = self.p95(PLAIN)
        return self.p95(ENC) / plain if plain else math.nan

    def cpu_ms(self, kind: str, server: str) -> float:
        values = (self.pg_cpu if kind == "pg" else self.app_cpu)[server]
        return 1000 * statistics.mean(values) if values else math.nan

    def as_dict(self) -> dict:
        return {"request": self.request, "label": self.label, "size": self.size, "n": self.n, "note": self.note,
                "latency_s": self.latency, "pg_cpu_s": self.pg_cpu, "app_cpu_s": self.app_cpu,
                "median_ms": {s: 1000 * self.median(s) for s in (PLAIN, ENC)},
                "p95_ms": {s: 1000 * self.p95(s) for s in (PLAIN, ENC)}, "ratio_median": self.ratio(),
                "ratio_p95": self.ratio_p95()}


@dataclass
class Throughput:
    clients: int
    seconds: dict[str, float] = field(default_factory=lambda: {PLAIN: 0.0, ENC: 0.0})
    done: dict[str, int] = field(default_factory=lambda: {PLAIN: 0, ENC: 0})
    errors: dict[str, int] = field(default_factory=lambda: {PLAIN: 0, ENC: 0})
    pg_cpu: dict[str, float] = field(default_factory=lambda: {PLAIN: 0.0, ENC: 0.0})
    app_cpu: dict[str, float] = field(default_factory=lambda: {PLAIN: 0.0, ENC: 0.0})

    def rps(self, server: str) -> float:
        return self.done[server] / self.seconds[server] if self.seconds[server] else math.nan

    def ratio(self) -> float:
        """owui-crypto's requests per second over plain Open WebUI's (< 1: a loss)."""
        plain = self.rps(PLAIN)
        return self.rps(ENC) / plain if plain else math.nan

    def cpu_ms(self, kind: str, server: str) -> float:
        total = (self.pg_cpu if kind == "pg" else self.app_cpu)[server]
        return 1000 * total / self.done[server] if self.done[server] else math.nan


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def markdown(cells: list[Cell], tput: Throughput | None, cpu_measured: bool, header: list[str]) -> str:
    """The results as Markdown: a header paragraph, the latency table, the throughput table."""
    lines = [*header, ""]
    cpu_cols = " PG CPU ms/req plain | PG CPU ms/req owui-crypto | app CPU ms/req plain | app CPU ms/req owui-crypto |"
    lines.append("| request | size | n | plain median ms | plain p95 ms | owui-crypto median ms | owui-crypto p95 ms |"
                 " ratio (median) | ratio (p95) |" + (cpu_cols if cpu_measured else ""))
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
                 + (" ---: | ---: | ---: | ---: |" if cpu_measured else ""))
    for c in cells:
        row = (f"| {c.label} | {c.size} | {c.n} | {_ms(1000 * c.median(PLAIN))} | {_ms(1000 * c.p95(PLAIN))} | "
               f"{_ms(1000 * c.median(ENC))} | {_ms(1000 * c.p95(ENC))} | **{_x(c.ratio())}** | {_x(c.ratio_p95())} |")
        if cpu_measured:
            row += (f" {_ms(c.cpu_ms('pg', PLAIN))} | {_ms(c.cpu_ms('pg', ENC))} | {_ms(c.cpu_ms('app', PLAIN))} |"
                    f" {_ms(c.cpu_ms('app', ENC))} |")
        lines.append(row)
    if tput is not None:
        lines += ["", f"Throughput, {tput.clients} concurrent clients, `GET /api/v1/chats/{{id}}` (chats of the "
                      "largest user, drawn at random):", "",
                  "| | plain | owui-crypto | owui-crypto / plain |", "| --- | ---: | ---: | ---: |",
                  f"| requests/s | {tput.rps(PLAIN):.1f} | {tput.rps(ENC):.1f} | **{_x(tput.ratio())}** |",
                  f"| requests (errors) | {tput.done[PLAIN]} ({tput.errors[PLAIN]}) | {tput.done[ENC]} "
                  f"({tput.errors[ENC]}) | |"]
        if cpu_measured:
            lines += [f"| PG CPU ms/req | {_ms(tput.cpu_ms('pg', PLAIN))} | {_ms(tput.cpu_ms('pg', ENC))} | |",
                      f"| app CPU ms/req | {_ms(tput.cpu_ms('app', PLAIN))} | {_ms(tput.cpu_ms('app', ENC))} | |"]
    return "\n".join(lines) + "\n"


def plot(cells: list[Cell], tput: Throughput | None, path: Path, title: str) -> str | None:
    """A PNG of owui-crypto / plain per request and size; returns why not, if it could not be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this venv (make bench-owui installs it)"
    rows = [(f"{c.label}  ·  {c.size}", c.ratio(), c.ratio_p95()) for c in cells]
    if tput is not None:  # shown as a slowdown like the rest: plain rps / owui-crypto rps
        inv = 1 / tput.ratio() if tput.ratio() else math.nan
        rows.append((f"throughput, {tput.clients} clients (plain rps / owui-crypto rps)", inv, math.nan))
    rows.reverse()  # first request at the top
    fig, ax = plt.subplots(figsize=(11, 0.36 * len(rows) + 1.6))
    y = list(range(len(rows)))
    medians = [r[1] for r in rows]
    colors = ["#c0504d" if m >= 2 else "#f0a35e" if m >= 1.25 else "#4f81bd" for m in medians]
    ax.barh(y, medians, color=colors, height=0.65)
    p95 = [(i, r[2]) for i, r in zip(y, rows, strict=True) if not math.isnan(r[2])]
    if p95:
        ax.plot([v for _, v in p95], [i for i, _ in p95], "k|", markersize=11, mew=2)
    for i, row in zip(y, rows, strict=True):
        if not math.isnan(row[1]):  # right of the bar and of its p95 tick
            ax.text(max(row[1], 0 if math.isnan(row[2]) else row[2]), i, f"  {row[1]:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    finite = [v for v in medians + [v for _, v in p95] if not math.isnan(v)]
    ax.set_xlim(0, max([1.5, *finite]) * 1.12)
    ax.set_xlabel("owui-crypto / plain Open WebUI (1 = same, 2 = twice as slow)")
    ax.set_title(title, fontsize=10)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#4f81bd", label="median ratio < 1.25"),
                       Patch(color="#f0a35e", label="median ratio 1.25 to 2"),
                       Patch(color="#c0504d", label="median ratio >= 2"),
                       Line2D([], [], color="black", marker="|", linestyle="None", markersize=11, mew=2,
                              label="p95 ratio")], loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
