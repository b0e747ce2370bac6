"""A PostgreSQL server of Debian's ``postgresql`` package for the sweep tests: started in a temporary folder on
a free port (as the user postgres when the tests run as root), stopped at the end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Debian's and Ubuntu's PostgreSQL server binaries (the newest installed version)
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
             else 0, default=Path("/usr/lib/postgresql/15/bin"))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoServer(RuntimeError):
    """No PostgreSQL server can start here; the message says why."""


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the server's ``postgresql+psycopg2://`` URL; raise :class:`NoServer` with the reason when none starts."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise NoServer("PostgreSQL needs psycopg2-binary (the sweep extra)") from None
    if not (PG_BIN / "initdb").is_file():
        raise NoServer(f"no PostgreSQL server binaries in {PG_BIN} (apt-get install postgresql)")
    as_postgres = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise NoServer("running as root and no runuser to start PostgreSQL as the user postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="iem-pg-"))
    try:
        if as_postgres:
            shutil.chown(folder, "postgres")
        data, port = folder / "data", _free_port()
        init = subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                               "--auth=trust"], capture_output=True, text=True)  # fmt: skip
        if init.returncode:
            raise NoServer(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
        start = subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                str(folder / "log"), "-w", "-t", "60", "start"], capture_output=True, text=True)  # fmt: skip
        if start.returncode:
            log = (folder / "log").read_text().strip().splitlines()[-1:] if (folder / "log").is_file() else []
            raise NoServer(f"PostgreSQL did not start: {start.stderr.strip()} {log}")
        try:
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True)  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
