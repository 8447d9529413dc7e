"""Where a standalone gateway's config comes from, and how a changed config is reloaded.

`Source` is what `serve()` and the supervisor start: `FileSource` here (a YAML file, reloaded on change or
SIGHUP), `control.ControlSource` (the control server) for a joined gateway. A source publishes each config with
its version; `Reloader` turns a file change into a validated config or a logged rejection that leaves the last
good config live.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from gateway.config import Config, ConfigError
from gateway.runtime import AdminState, Publish, Spawn
from gateway.units import Address

log = logging.getLogger("meshgate.gateway")


class Source(Protocol):
    """Where a gateway's config comes from: a file (standalone) or the control server (joined)."""

    server_tls: ssl.SSLContext | None  # the inbound listener's, made before any config arrives
    client_tls: ssl.SSLContext | None  # for dialing peer gateways
    client_tls_h2: ssl.SSLContext | None  # the same, offering ALPN h2

    def start(self, state: AdminState, publish: Publish, addresses: dict[str, Address], spawn: Spawn) -> None:
        """Publish the first config if there is one, and keep publishing changes (and `state.ready`)."""

    async def close(self) -> None: ...


class ConfigFile:
    """The config file a standalone gateway runs from; reloaded on SIGHUP and when it changes on disk."""

    def __init__(self, path: str, advertise: str | None = None) -> None:
        self.path = path
        self.advertise = advertise  # `--advertise`, which every reload keeps
        self.signature = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        signature = self._stat()
        if signature == self.signature:
            return False
        self.signature = signature
        return True

    def load(self) -> Config:
        self.signature = self._stat()
        return Config.load(self.path, self.advertise)


class Reloader:
    """Validates a changed config and hands it on; a bad file is logged and the last good config stays."""

    def __init__(self, source: ConfigFile, state: AdminState, publish: Callable[[Config, int], None]) -> None:
        self.source = source
        self.state = state
        self.publish = publish

    def reload(self, reason: str) -> None:
        try:
            config = self.source.load()
        except ConfigError as exc:
            self.state.last_reload = f"rejected: {exc}"
            log.error("config reload (%s) rejected, keeping version %d: %s", reason, self.state.version, exc)
            return
        live = self.state.config.gateway
        if (config.gateway.listen, config.gateway.tls) != (live.listen, live.tls):
            # Sockets and their TLS contexts are made once; report what is really serving, not the wish.
            log.warning("config reload (%s): gateway.listen and gateway.tls change only on restart; kept", reason)
            config = replace(config, gateway=replace(config.gateway, listen=live.listen, tls=live.tls))
        self.state.config = config
        self.state.version += 1
        self.state.last_reload = "ok"
        self.publish(config, self.state.version)
        log.info("config version %d applied (%s)", self.state.version, reason)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.source.changed():
                self.reload("file changed")


def server_tls(config: Config) -> ssl.SSLContext | None:
    """Inbound mTLS for a standalone gateway with a `tls` block: peers must present a cert from `ca`."""
    tls = config.gateway.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class FileSource:
    """A standalone gateway's YAML file: reloaded on SIGHUP and when it changes on disk."""

    def __init__(self, path: str, config: Config, advertise: str | None = None) -> None:
        self.file = ConfigFile(path, advertise)
        self.server_tls = server_tls(config)
        self.client_tls: ssl.SSLContext | None = None  # standalone gateways dial no peers
        self.client_tls_h2: ssl.SSLContext | None = None

    def start(self, state: AdminState, publish: Publish, addresses: dict[str, Address], spawn: Spawn) -> None:
        state.version = 1
        publish(state.config, state.version, None)
        state.ready = True
        reloader = Reloader(self.file, state, lambda config, version: publish(config, version, None))
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        spawn(reloader.watch())

    async def close(self) -> None:
        pass
