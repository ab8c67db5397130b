"""Run the app under uvicorn with a graceful drain on SIGTERM.

SIGTERM: readiness turns false at once; the server keeps serving for `drain_grace_s` (load
balancers notice and stop sending), then stops accepting, lets in-flight and queued requests
finish within `drain_timeout_s` (what is still queued or computing then answers 503), runs the
lifespan shutdown and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from service import connections
from service.api.app import create_app
from service.errors import DRAIN_OUT
from service.logs import configure as configure_logs
from service.settings import Settings

log = logging.getLogger("mcserve.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings
        self.exit_at: float | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.exit_at is not None:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        st = _find_state(self.config.loaded_app)
        if st is None:  # before the app: nothing to drain
            super().handle_exit(sig, frame)
            return
        if not st.started:  # loading: stop after the version in hand (lifecycle.py), exit 0
            st.draining = True
            self.should_exit = True  # (uvicorn's own handler would re-raise the signal at exit)
            log.info("stopping during start-up")
            return
        st.draining = True
        self.exit_at = time.monotonic() + self.settings.drain_grace_s
        log.info("draining", extra={"grace_s": self.settings.drain_grace_s})

    async def on_tick(self, counter: int) -> bool:
        if self.exit_at is not None and time.monotonic() >= self.exit_at and not self.should_exit:
            self.should_exit = True
            self._give_up_later()
        return await super().on_tick(counter)

    def _give_up_later(self) -> None:
        """When the drain time is out, uvicorn cancels the requests still running, and each
        answers 500 with a traceback in the log. Shortly before, the batchers fail what they
        still hold with a 503 that says so (uvicorn starts its clock 0.1-0.2 s after this)."""
        limit = drain_limit(self.settings)
        st = _find_state(self.config.loaded_app)
        if not limit or st is None:
            return
        loop = asyncio.get_running_loop()

        def give_up() -> None:
            for b in list(st.batchers.values()):
                task = loop.create_task(b.stop(drain=False, reason=DRAIN_OUT))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

        loop.call_later(max(0.0, limit - 0.4), give_up)


def drain_limit(settings: Settings) -> int:
    """uvicorn's graceful-shutdown timeout in whole seconds (0: none). Rounded up: 0.5 was
    read as 0, which uvicorn takes for no limit at all."""
    return math.ceil(settings.drain_timeout_s)


def _find_state(app: Any) -> Any:
    while app is not None:
        st = getattr(getattr(app, "state", None), "mcserve", None)
        if st is not None:
            return st
        app = getattr(app, "app", None)
    return None


def run(overrides: dict[str, Any], warnings: Sequence[str] = ()) -> None:
    """Serve; `warnings`: what the settings check found, logged once the log format is set (a
    plain line before it broke a JSON log's one object per line)."""
    settings = Settings(**overrides)
    configure_logs(settings.log_level, settings.log_format)  # text logs keep the fields too
    for w in warnings:
        log.warning("settings: %s", w)
    app = create_app(settings)
    limits = connections.Limits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_pending=settings.max_pending_connections,
        max_connections=settings.max_connections or connections.default_max_connections(),
    )
    guard = connections.Guard(limits)
    app.state.metrics.watch_connections(guard.closed)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="uvloop",
        http=connections.protocol(guard),  # httptools, with deadlines
        limit_concurrency=connections.uvicorn_limit(settings.max_concurrency),
        access_log=False,
        lifespan="on",
        log_config=None,  # our JSON handler, not uvicorn's
        timeout_graceful_shutdown=drain_limit(settings) or None,
        proxy_headers=bool(settings.forwarded_allow_ips),  # uvicorn would trust 127.0.0.1
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )
    DrainingServer(config, settings).run()
