"""``owui-crypto serve`` with the real open-webui installed: refusals happen before anything is touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("owui-crypto"))


@pytest.mark.parametrize(("env", "says"), [
    ({"DATABASE_URL": "sqlite:///webui.db"}, "cannot protect SQLite"),
    ({"DATABASE_URL": "postgresql+psycopg2://u@127.0.0.1:9/d"}, "Use postgresql+psycopg://"),
    ({"DATABASE_URL": "postgresql://u@127.0.0.1:9/d", "DATABASE_SCHEMA": "owui"}, "DATABASE_SCHEMA='owui' is set"),
    ({"DATABASE_URL": "postgresql://u@127.0.0.1:9/d", "UVICORN_WORKERS": "2"}, "UVICORN_WORKERS=1"),
])
def test_serve_refuses_and_says_what_to_change(tmp_path, env, says):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "UVICORN_"))}
    result = subprocess.run([CLI, "serve"], check=False, env={**clean, "WEBUI_SECRET_KEY": "x" * 32, **env},
                            cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
