"""Sockets for the servers we start (``lbm-reg serve``, ``lbm-reg ui``)."""

from __future__ import annotations

import socket

from lbm_registry.errors import ConfigError


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening (port 0: a free one, read back with
    ``getsockname``). A taken port or an unknown host is a one-line :class:`ConfigError`,
    raised before a server spends seconds starting; a server handed this socket holds its
    port from then on."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sock


def check_bindable(host: str, port: int) -> None:
    """Raise :class:`ConfigError` unless ``host:port`` can be listened on now: for a server
    another program runs (the MLflow UI), checked before it starts instead of met as its
    traceback."""
    listening_socket(host, port).close()
