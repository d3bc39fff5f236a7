"""Server settings that would put chat text or keys into PostgreSQL's log.

Keys never travel in SQL text or as plain parameters (``app_adapter.transport``),
but Open WebUI writes chat text as bind parameters, search terms included, and
several settings copy parameters, plan constants or failing values into the
log. :func:`leaking_settings` names each such setting with what to change; the
``owui-crypto check`` command prints them.
"""

from __future__ import annotations

from typing import Any

_NAMES = (
    "log_statement", "log_min_duration_statement", "log_min_duration_sample", "log_parameter_max_length",
    "log_parameter_max_length_on_error", "log_min_error_statement", "log_error_verbosity",
    "shared_preload_libraries", "session_preload_libraries", "local_preload_libraries",
    "debug_print_parse", "debug_print_rewritten", "debug_print_plan",
)
_AUTO_EXPLAIN = ("auto_explain.log_min_duration", "auto_explain.log_verbose", "auto_explain.log_analyze")


def _settings(conn: Any) -> dict[str, str | None]:
    names = list(_NAMES + _AUTO_EXPLAIN)
    rows = conn.execute("SELECT n, current_setting(n, true) FROM unnest(%s::text[]) AS n", (names,)).fetchall()
    return dict(rows)


def leaking_settings(conn: Any) -> list[str]:
    """One line per setting of this session's server that would log chat text; empty when none."""
    s = _settings(conn)
    problems = []
    logs_statements = s["log_statement"] != "none" or s["log_min_duration_statement"] != "-1" or (
        s["log_min_duration_sample"] not in (None, "-1"))
    if logs_statements and s["log_parameter_max_length"] != "0":
        problems.append(
            f"the server logs statements (log_statement={s['log_statement']}, log_min_duration_statement="
            f"{s['log_min_duration_statement']}) with their parameters (log_parameter_max_length="
            f"{s['log_parameter_max_length']}): chat text written by Open WebUI reaches the log. "
            "Set log_parameter_max_length = 0 (parameter group on RDS/Aurora).")
    if s["log_parameter_max_length_on_error"] != "0" and s["log_min_error_statement"] != "panic":
        problems.append(
            f"log_parameter_max_length_on_error = {s['log_parameter_max_length_on_error']}: a failing statement is "
            "logged with its parameters (chat text). Set it to 0.")
    if s["log_error_verbosity"] != "terse":
        problems.append(
            f"log_error_verbosity = {s['log_error_verbosity']}: an error's DETAIL and CONTEXT can quote the value "
            "that failed (e.g. decrypted JSON that did not cast). Set log_error_verbosity = terse.")
    libraries = ",".join(s[n] or "" for n in ("shared_preload_libraries", "session_preload_libraries",
                                              "local_preload_libraries"))
    auto_explain_on = "auto_explain" in libraries and (s["auto_explain.log_min_duration"] or "-1") != "-1"
    if auto_explain_on:
        problems.append(
            f"auto_explain is loaded with auto_explain.log_min_duration = {s['auto_explain.log_min_duration']}"
            f" (log_verbose={s['auto_explain.log_verbose']}, log_analyze={s['auto_explain.log_analyze']}): "
            "its plans print the values of search terms and written titles, whatever "
            "log_parameter_max_length says. Set auto_explain.log_min_duration = -1 or unload it.")
    for name in ("debug_print_parse", "debug_print_rewritten", "debug_print_plan"):
        if s[name] == "on":
            problems.append(f"{name} = on: query trees with constants reach the log. Turn it off.")
    return problems
