"""What `owui-crypto check` asks of the server beyond drift: settings that would put chat text
into PostgreSQL's log, and schemas on the keyed path where the application could plant code.

Server settings first.

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
    "debug_print_parse", "debug_print_rewritten", "debug_print_plan",
)
_AUTO_EXPLAIN = ("auto_explain.log_min_duration", "auto_explain.log_verbose", "auto_explain.log_analyze")


def _settings(conn: Any) -> dict[str, str | None]:
    """The settings by name; pg_settings leaves out what this role may not read (None here).

    auto_explain's settings appear with their real types only where the library is loaded into
    sessions (shared_, session_ or local_preload_libraries, which a non-superuser may not read):
    that is how its presence is told, from any role."""
    names = list(_NAMES + _AUTO_EXPLAIN)
    rows = conn.execute("SELECT name, setting FROM pg_catalog.pg_settings WHERE name = ANY(%s)"
                        " AND NOT (name = 'auto_explain.log_min_duration' AND vartype <> 'integer')",
                        (names,)).fetchall()
    return {**dict.fromkeys(names), **dict(rows)}


def leaking_settings(conn: Any) -> list[str]:
    """One line per setting of this session's server that would log chat text; empty when none."""
    s = _settings(conn)
    problems = [f"cannot read {name} as this role, so it was not checked: run check as a role with "
                "pg_read_all_settings (the master user on RDS/Aurora)" for name in _NAMES if s[name] is None]
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
    if (s["auto_explain.log_min_duration"] or "-1") != "-1":
        problems.append(
            f"auto_explain is loaded with auto_explain.log_min_duration = {s['auto_explain.log_min_duration']}"
            f" (log_verbose={s['auto_explain.log_verbose']}, log_analyze={s['auto_explain.log_analyze']}): "
            "its plans print the values of search terms and written titles, whatever "
            "log_parameter_max_length says. Set auto_explain.log_min_duration = -1 or unload it.")
    for name in ("debug_print_parse", "debug_print_rewritten", "debug_print_plan"):
        if s[name] == "on":
            problems.append(f"{name} = on: query trees with constants reach the log. Turn it off.")
    return problems


#: The schemas every keyed transaction searches (app_adapter.hook.VIEW_SEARCH_PATH, pg_temp aside).
KEYED_PATH_SCHEMAS = ("owui_crypto_view", "public")


def path_creators(conn: Any) -> list[str]:
    """Roles other than owui-crypto's owner that may create objects in a schema every keyed
    transaction searches. A function or operator planted there (say ``public."="(varchar, varchar)``)
    runs inside other users' transactions, where their key is a setting it can read."""
    rows = conn.execute(
        """SELECT n.nspname, CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
             FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
            WHERE n.nspname = ANY(%s) AND a.privilege_type = 'CREATE'
              AND (a.grantee = 0 OR a.grantee IN (SELECT r.oid FROM pg_roles r JOIN owui_crypto.grantee g
                                                                      ON g.role_name = r.rolname))
           UNION
           SELECT n.nspname, g.role_name FROM pg_namespace n, owui_crypto.grantee g
            WHERE n.nspname = ANY(%s) AND pg_has_role(g.role_name, n.nspowner, 'USAGE')
           ORDER BY 1, 2""", (list(KEYED_PATH_SCHEMAS), list(KEYED_PATH_SCHEMAS))).fetchall()
    return [f"{role} may create objects in schema {schema}, which every keyed transaction searches: a function "
            f"or operator planted there would run inside other users' transactions and could read their key. "
            f"Run owui-crypto grant (it revokes CREATE on public from PUBLIC and the application role), or "
            f"REVOKE CREATE ON SCHEMA {schema} FROM {role}" for schema, role in rows]
