"""Server-sent events framing, and a stream that ends with an error event instead of hanging."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from .errors import server_error_body

log = logging.getLogger(__name__)


def event(data: dict | str, name: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"


def sse_response(
    events: AsyncIterator[str], request_id: str, error_event: str | None, tail: tuple[str, ...] = ()
) -> StreamingResponse:
    """Stream ``events``; if they fail midway, send an error event (named ``error_event``),
    then ``tail`` (e.g. ``data: [DONE]``), and close: the status line went out long ago."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for item in events:
                yield item
        except Exception:
            log.exception("stream failed in request %s", request_id)
            yield event(server_error_body(request_id), error_event)
            for item in tail:
                yield item

    # no-cache and no proxy buffering: each event must reach the client when it is produced.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)
