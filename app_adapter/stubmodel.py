"""A stub OpenAI-compatible model on loopback, so Open WebUI runs real completions offline.

The demo and the e2e suite each answer in their own words (:meth:`StubModelHandler.reply`); the protocol -- one
model listed at ``GET /v1/models``, ``POST /v1/chat/completions`` answered whole or streamed word by word as
server-sent events -- is written once, here.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from typing import Any


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a chat completion request (content parts joined)."""
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


class StubModelHandler(BaseHTTPRequestHandler):
    """Serve with a subclass that names its model and says what it answers."""

    protocol_version = "HTTP/1.1"
    model = "stub-model"
    owned_by = "owui-crypto"

    def reply(self, body: dict[str, Any]) -> str:
        raise NotImplementedError

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per request otherwise

    def _json(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                    "owned_by": self.owned_by}]})
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        text = self.reply(body)
        base = {"id": "stub", "created": int(time.time()), "model": self.model}
        if not body.get("stream"):
            self._json({**base, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        words = text.split(" ")
        for i, word in enumerate(words):  # word by word, as a model streams
            delta = {"content": word + (" " if i < len(words) - 1 else "")}
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True
