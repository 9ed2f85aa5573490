"""A real `mlflow server` on 127.0.0.1 for the slow tests (started and always stopped by the caller).

- :func:`start_server`: a plain one-worker server on a database (no authentication).
- :func:`start_auth_server`: what a team runs: MLflow's ``basic-auth`` app on a database (PostgreSQL in the tests),
  with proxied artifact storage (``--artifacts-destination``: clients upload and download through the server and
  never see the folder). The user database and its ini live in the server's folder; the admin is ``admin`` with a
  random password. By hand: ``python -m tests.helpers.mlflow_server`` (a PostgreSQL server too; prints the URL).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(server: subprocess.Popen, port: int, log: Path | None = None) -> None:
    """Return once /health answers (it needs no credentials on the basic-auth app either)."""
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                stop(server)
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"mlflow server did not start\n{tail}") from None
            time.sleep(0.5)


def start_server(db: str, port: int) -> subprocess.Popen:
    """Start a one-worker server on ``db``; return once /health answers (~5-10 s)."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            db,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_healthy(server, port)
    return server


@dataclass
class AuthServer:
    """A running basic-auth server. ``url`` holds no credentials; ``admin_password`` is the ``admin`` user's."""

    process: subprocess.Popen
    port: int
    folder: Path
    admin_password: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # holds the admin password: never print it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        """The folder behind the server's artifact proxy (clients never open it)."""
        return self.folder / "artifacts"

    def client_env(self, username: str = "admin", password: str | None = None) -> dict[str, str]:
        """The environment a client (train.py, MlflowClient) needs to log in as ``username``."""
        return {
            "MLFLOW_TRACKING_USERNAME": username,
            "MLFLOW_TRACKING_PASSWORD": self.admin_password if password is None else password,
        }

    def stop(self) -> None:
        stop(self.process)

    def restart(self) -> float:
        """Stop the server (SIGTERM, as a restart does) and start it again on the same port, database, users and
        secret key; return the seconds it was down (clients' requests fail meanwhile)."""
        down = time.monotonic()
        self.stop()
        self.process = _popen(self.command, self.folder, self.env)
        _wait_healthy(self.process, self.port, self.folder / "server.log")
        return time.monotonic() - down


def _popen(command: list[str], folder: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(folder / "server.log", "a") as out:
        return subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)


def auth_ini(user_db: str, default_permission: str) -> str:
    """MLflow's basic-auth config (the format of ``mlflow/server/auth/basic_auth.ini``). ``default_permission``:
    what a user may do on an experiment nobody gave them a permission on (READ, EDIT, MANAGE, NO_PERMISSIONS);
    the admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD, so it is not written into the file."""
    return (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {user_db}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def start_auth_server(
    backend_store_uri: str,
    folder: Path,
    port: int | None = None,
    default_permission: str = "READ",
    user_db: str | None = None,
) -> AuthServer:
    """``mlflow server --app-name basic-auth`` on ``backend_store_uri`` with its artifacts proxied from
    ``folder/artifacts``; users in ``user_db`` (default: SQLite in ``folder``). Returns once /health answers
    (~15 s on 2 cores). Server output goes to ``folder/server.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    password = secrets.token_urlsafe(16)
    (folder / "basic_auth.ini").write_text(
        auth_ini(user_db or f"sqlite:///{folder / 'basic_auth.db'}", default_permission)
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,  # creates the admin at the first start
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # CSRF protection of the auth app's forms
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner process: faster start, less memory
    }
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    log = folder / "server.log"
    log.write_text("")
    command = [
        sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = _popen(command, folder, env)
    _wait_healthy(server, port, log)
    return AuthServer(process=server, port=port, folder=folder, admin_password=password, command=command, env=env)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


if __name__ == "__main__":
    import tempfile

    from tests.helpers.postgres import start_postgres

    pg = start_postgres()
    try:
        srv = start_auth_server(pg.create_database("mlflow"), Path(tempfile.mkdtemp(prefix="clipqa-mlflow-")))
        print(f"MLflow (basic-auth, PostgreSQL) at {srv.url}; admin password in {srv.folder / 'admin_password'}")
        (srv.folder / "admin_password").write_text(srv.admin_password)
        try:
            input("Enter stops it ")
        finally:
            srv.stop()
    finally:
        pg.stop()
