"""The README's tables say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from app_adapter.config import settings_table_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_policy_table_matches_the_policy(app):
    table = README.split("<!-- policy-table:start -->")[1].split("<!-- policy-table:end -->")[0]
    documented = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        documented[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[1]))
    live = {}
    for table_name, column in app.execute("SELECT table_name, column_name FROM owui_crypto.protected_column"):
        live.setdefault(table_name, set()).add(column)
    assert documented == live


def test_environment_table_matches_the_settings():
    assert settings_table_markdown() in README
