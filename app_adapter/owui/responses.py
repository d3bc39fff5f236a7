"""Refusals of the database (and of the key service) as clear HTTP answers.

The SQL refuses, with its own SQLSTATEs (``sql/30_seal.sql``), a write that
needs a key the transaction does not hold: another user's chat (OC002), no
user bound at all (OC001). Open WebUI rarely lets such an error reach
FastAPI: most of its model methods catch every exception and return ``None``,
and the endpoint then answers 401, 400 or a 500 of its own (an
``AttributeError`` on that ``None``). So a refusal is seen where it happens,
in SQLAlchemy's ``handle_error`` event, and noted in a per-request list; an
ASGI wrapper around the whole application replaces an *error* response of a
request that met a refusal by a 403/409 that says what happened. A success
response is left alone: Open WebUI decided the failed write was optional
(it logs such cases itself).

Messages name users and rows, never content, keys or SQL parameters.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event

from app_adapter import errors

log = logging.getLogger("owui_crypto.responses")

_STATUS: tuple[tuple[type[errors.OwuiCryptoError], int, str], ...] = (
    (errors.NotOwner, 403,
     "This chat belongs to another user. Its content is encrypted under their key, so only they can change it."),
    (errors.OwnerChange, 409,
     "Encrypted chat content cannot move to another owner; copy it as the new owner instead."),
    (errors.NoKeyActive, 409,
     "This change needs the encryption key of a signed-in user, and none is active for this request."),
    (errors.WrongKey, 403,
     "The encryption key of this account is not registered (the account may have been deleted)."),
    (errors.IntegrityFailure, 500,
     "A stored encrypted value failed its integrity check; it was tampered with or is corrupt."),
    (errors.NotProvisioned, 403,
     "This account has no encryption key (it may have been deleted); ask an administrator."),
    (errors.KmsThrottled, 503, "The key service is throttling requests; try again shortly."),
    (errors.KmsUnreachable, 503, "The key service cannot be reached; try again shortly."),
    (errors.KeyUnavailable, 503, "A key of the key service is disabled or missing; an administrator must fix it."),
    (errors.CannotUnwrap, 500, "An encryption key could not be unwrapped."),
)


def describe(exc: BaseException) -> tuple[int, str] | None:
    """HTTP status and message for an owui-crypto error (or a database error carrying one), else None."""
    if not isinstance(exc, errors.OwuiCryptoError):
        exc = errors.from_database(exc)  # type: ignore[assignment]
        if exc is None:
            return None
    for cls, status, message in _STATUS:
        if isinstance(exc, cls):
            return status, message
    return 500, f"owui-crypto refused the operation ({type(exc).__name__})."


# -- noting refusals per request ------------------------------------------------

_seen: ContextVar[list[errors.DatabaseRefusal] | None] = ContextVar("owui_crypto_refusals", default=None)

# Every refusal since start, by SQLSTATE: app_adapter.metrics reads it at scrape time.
_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def refusal_counts() -> dict[str, int]:
    """Refusals noted by :func:`watch_engine` in this process since it started, by SQLSTATE (``OC002``...)."""
    with _counts_lock:
        return dict(_counts)


def watch_engine(engine: Any) -> None:
    """Note every owui-crypto refusal raised through ``engine`` (Engine or AsyncEngine)."""
    event.listen(getattr(engine, "sync_engine", engine), "handle_error", _on_error)


def _on_error(context: Any) -> None:
    refusal = errors.from_database(context.original_exception)
    if refusal is None:
        return
    with _counts_lock:
        _counts[refusal.sqlstate] += 1
    seen = _seen.get()
    if seen is not None:
        seen.append(refusal)
    # The primary message names the user and the row, never content.
    log.info("owui-crypto refused: %s (%s)", refusal, refusal.sqlstate)


class RefusalResponses:
    """ASGI wrapper: an error response of a request that met a refusal becomes that refusal's answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:  # state, routes... of the wrapped app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        seen: list[errors.DatabaseRefusal] = []
        token = _seen.set(seen)
        replaced = False

        async def guarded_send(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] >= 400 and seen:
                replaced = True
                status, detail = describe(seen[-1]) or (500, "refused")
                body = json.dumps({"detail": detail, "owui_crypto": seen[-1].sqlstate}).encode()
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in (b"content-length", b"content-type", b"content-encoding")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            if replaced:
                return  # the original body of the replaced response
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            if not replaced:
                raise
            log.warning("%s %s: answered %s after a refusal", scope.get("method"), scope.get("path"),
                        type(seen[-1]).__name__)
        finally:
            _seen.reset(token)


def install_exception_handlers(app: Any) -> None:
    """Answer owui-crypto errors that do reach FastAPI directly, without a 500 traceback."""
    from sqlalchemy.exc import DBAPIError
    from starlette.responses import JSONResponse

    async def owui_crypto_error(request: Any, exc: Exception) -> Any:
        described = describe(exc)
        if described is None:
            raise exc
        status, detail = described
        code = getattr(exc, "sqlstate", "") or getattr(errors.from_database(exc), "sqlstate", "")
        return JSONResponse({"detail": detail, "owui_crypto": code or type(exc).__name__}, status_code=status)

    app.add_exception_handler(errors.OwuiCryptoError, owui_crypto_error)
    app.add_exception_handler(DBAPIError, owui_crypto_error)
