"""Disaster recovery against the real Open WebUI: what ``owui-crypto recover`` gets out of a dump is
Open WebUI's own export, and Open WebUI imports it back.

Runs on the session's server (one Open WebUI per e2e run; a second server would
add half a minute), with users of its own: the chats' owner, and a fresh
account that receives the import in place of a fresh server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import jwt

from app_adapter.devdb import Server
from e2e.conftest import Owui
from e2e.owui_api import User, add_user, message_texts, new_chat, ok, signup
from tests.dumps import restore_public_dump


def admin_token(owui: Owui) -> str:
    """An admin's token: the first sign-up when this file runs alone, else one for the existing admin.

    Open WebUI closes sign-up once its admin exists and test_owui's admin
    belongs to that module, so the token is minted as Open WebUI mints it
    (HS256 over WEBUI_SECRET_KEY, which the harness set).
    """
    rows = owui.sql("""SELECT u.id, a.session_stamp FROM public."user" u JOIN public.auth a ON a.id = u.id
                         WHERE u.role = 'admin' ORDER BY u.created_at LIMIT 1""")
    if not rows:
        with owui.client() as anonymous:
            return signup(anonymous, "Ada Admin", "ada-admin@example.com", "recover-Pw-12345").token
    admin_id, session_stamp = rows[0]
    claims = {"id": admin_id, "typ": "session", "session_stamp": session_stamp, "jti": str(uuid.uuid4()),
              "iat": int(time.time())}
    return jwt.encode(claims, owui.env["WEBUI_SECRET_KEY"], algorithm="HS256")


def new_user(owui: Owui, admin: str, name: str) -> User:
    email = f"{name.split(maxsplit=1)[0].lower()}-{uuid.uuid4().hex[:8]}@example.com"
    with owui.client(admin) as c, owui.client() as anonymous:
        return add_user(c, name, email, "recover-Pw-12345", anonymous)


def export_of(client: httpx.Client) -> list[dict]:
    """``GET /api/v1/chats/all`` (NDJSON in 0.12.4) as the web client saves it: a JSON list."""
    return [json.loads(line) for line in ok(client.get("/api/v1/chats/all")).text.splitlines() if line.strip()]


def test_recovered_export_is_open_webuis_own_and_imports_back(owui: Owui, pg_server: Server, kms_server,
                                                              tmp_path: Path) -> None:
    admin = admin_token(owui)
    owner = new_user(owui, admin, "Olivia Owner")
    with owui.client(owner.token) as c:
        chats = [new_chat(c, owner, f"recover {i}", n_messages=4) for i in range(3)]
        ok(c.post(f"/api/v1/chats/{chats[0].id}/pin"))
        ok(c.post(f"/api/v1/chats/{chats[1].id}/tags", json={"name": "recover-tag"}))
        original = export_of(c)
    assert {e["id"] for e in original} == {chat.id for chat in chats}

    restored = restore_public_dump(pg_server, owui.database_url, tmp_path)
    try:
        out = tmp_path / "recovered"
        result = subprocess.run([sys.executable, "-m", "app_adapter.cli", "recover", "--out", str(out), "--user",
                                 owner.id, "--database-url", restored, "--no-progress"], check=False,
                                capture_output=True, text=True, env=dict(os.environ), timeout=300)
    finally:
        pg_server.drop_database(restored.rsplit("/", 1)[1])
    assert result.returncode == 0, result.stdout + result.stderr
    recovered = json.loads((out / f"{owner.id}.json").read_text(encoding="utf-8"))
    assert recovered == original  # field for field what Open WebUI itself exports

    fresh = new_user(owui, admin, "Rita Restorer")
    with owui.client(fresh.token) as c:
        # The form the web client's Import Chats sends for each entry of an export file.
        ok(c.post("/api/v1/chats/import", json={"chats": [
            {"chat": e["chat"], "meta": e["meta"], "pinned": e["pinned"], "folder_id": e["folder_id"],
             "created_at": e["created_at"], "updated_at": e["updated_at"]} for e in recovered]}))
        back = {e["title"]: e for e in export_of(c)}
    assert set(back) == {chat.title for chat in chats}
    for chat in chats:
        again = back[chat.title]
        assert again["user_id"] == fresh.id and message_texts(again["chat"]) == sorted(chat.texts)
        first = next(e for e in original if e["id"] == chat.id)
        assert (again["pinned"], again["meta"].get("tags"), again["created_at"]) == (
            first["pinned"], first["meta"].get("tags"), first["created_at"])
    sealed = owui.sql("SELECT title FROM public.chat WHERE user_id = %s", (fresh.id,))
    assert len(sealed) == 3 and all(title.startswith("oc1:") for (title,) in sealed)  # sealed again on import
