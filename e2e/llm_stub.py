"""A tiny OpenAI-compatible model on 127.0.0.1, so Open WebUI runs real completions offline.

``GET /v1/models`` lists one model; ``POST /v1/chat/completions`` answers
``"echo: <last user message>"`` (streamed as server-sent events when asked),
so an assistant reply carries the user's text and must be sealed like it.
Any other request (title or tag generation...) gets the same kind of answer.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

from app_adapter.stubmodel import StubModelHandler, last_user_text

MODEL = "e2e-stub-model"


def reply_to(body: dict) -> str:
    return f"echo: {last_user_text(body)}"


class _Handler(StubModelHandler):
    model = MODEL
    owned_by = "e2e"

    def reply(self, body: dict) -> str:
        self.server.requests.append(body)  # type: ignore[attr-defined]
        return reply_to(body)


class LlmStub:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.requests = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[dict]:
        return self.server.requests  # type: ignore[attr-defined]

    def __enter__(self) -> LlmStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
