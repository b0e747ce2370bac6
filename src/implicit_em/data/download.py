"""Fetching a dataset with torchvision only after a quick check that its server answers.

Offline (no route to the server, or ``IEM_OFFLINE=1`` in the environment) the caller gets one
:class:`DataError` line within seconds instead of torchvision's retries and traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from urllib.parse import urlparse

from implicit_em.errors import DataError
from implicit_em.run.loggers import reachable

#: set to 1 to never touch the network (downloads fail at once with the usual message)
OFFLINE_ENV = "IEM_OFFLINE"


def offline() -> bool:
    """Whether the user asked for no network access (``IEM_OFFLINE`` set to anything but 0/false/empty)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def host_port(url: str) -> tuple[str, int]:
    """(host, port) of a download URL, the port from the scheme when the URL has none."""
    u = urlparse(url)
    return u.hostname or "", u.port or (80 if u.scheme == "http" else 443)


def fetch(name: str, urls: Iterable[str], download: Callable[[], None], looked_in: str, how_to_get: str) -> None:
    """Run ``download()`` if one of ``urls``' servers answers within 5 s; otherwise, or when it fails, raise
    one :class:`DataError` line naming the dataset, the folders looked in and how to supply the files."""
    hosts = sorted({host_port(u) for u in urls})
    names = ", ".join(h for h, _ in hosts)
    if offline():
        raise DataError(
            f"{name}: files not found, and {OFFLINE_ENV} forbids downloading them; looked in {looked_in}; {how_to_get}"
        )
    if not any(reachable(h, timeout=5) for h in hosts):
        raise DataError(
            f"{name}: files not found and no network to download them (tried {names}); looked in {looked_in}; {how_to_get}"
        )
    try:
        download()
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... depending on the failure
        msg = " ".join(str(e).split())
        raise DataError(
            f"{name}: download failed ({e.__class__.__name__}: {msg}); looked in {looked_in}; {how_to_get}"
        ) from None
