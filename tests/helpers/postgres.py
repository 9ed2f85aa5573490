"""A real PostgreSQL server in a temp folder, for the slow tier's shared-services tests (Optuna and MLflow on it).

:func:`start_postgres` runs ``initdb`` with a password-protected superuser (SCRAM), then ``pg_ctl start`` listening
on 127.0.0.1 and a free port of its own, with no Unix socket, so it never meets the machine's own cluster or a
second test run. PostgreSQL refuses to run as root: as root the folder is handed to the ``postgres`` user and every
server command runs through ``runuser -u postgres``; as any other user the commands run directly.
:meth:`Postgres.stop` is ``pg_ctl stop -m fast`` and removes the folder. Debian's ``postgresql`` package provides
the binaries (``/usr/lib/postgresql/<version>/bin``); ``.ci/run`` installs it where missing.

By hand (prints the URL, keeps the server until Enter):

    python -m tests.helpers.postgres
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "postgresql"  # Debian's; .ci/run installs it


def bin_dir() -> Path | None:
    """The newest installed server's binaries (Debian keeps one folder per major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    folder: Path
    port: int
    password: str
    bindir: Path

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        """A SQLAlchemy URL (Optuna and MLflow take these). It holds the password: never log it."""
        return f"{driver}://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", password=self.password, dbname="postgres"
        )
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return self.url(name)

    def stop(self) -> None:
        _as_owner([str(self.bindir / "pg_ctl"), "stop", "-m", "fast", "-D", str(self.folder / "data")], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _as_owner(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)


def start_postgres() -> Postgres:
    """initdb + pg_ctl start in a fresh temp folder; returns once the server accepts connections."""
    bindir = bin_dir()
    if bindir is None:
        raise RuntimeError(f"PostgreSQL is not installed: apt-get install {PACKAGE}")
    # Directly under the temp root (not pytest's tmp_path): pytest's folders are private to root, and the server
    # runs as the postgres user, which must be able to reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="clipqa-pg-"))
    password = secrets.token_hex(16)
    (folder / "pw").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "pw", "postgres")
    port = _free_port()
    _as_owner(
        [str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "postgres", f"--pwfile={folder / 'pw'}",
         "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"]
    )  # fmt: skip
    (folder / "pw").unlink()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
    options += " -c max_connections=200 -c fsync=off"  # many test clients; durability is not what tests check
    started = _as_owner(
        [str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(folder / "data"), "-l", str(folder / "log"),
         "-o", options],
        check=False,
    )  # fmt: skip
    if started.returncode != 0:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}{log}")
    server = Postgres(folder=folder, port=port, password=password, bindir=bindir)
    deadline = time.time() + 30
    while True:  # pg_ctl -w waits for the server; a first connection can still race its start-up
        try:
            import psycopg2

            psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password).close()
            return server
        except Exception:
            if time.time() > deadline:
                server.stop()
                raise
            time.sleep(0.3)


if __name__ == "__main__":
    pg = start_postgres()
    print(f"PostgreSQL on 127.0.0.1:{pg.port}: {pg.url()}")
    try:
        input("Enter stops it ")
    finally:
        pg.stop()
