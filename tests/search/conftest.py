"""Fixtures of the search tests: a real PostgreSQL server on loopback for the many-worker tests.

The server comes from the Debian ``postgresql`` package (``/usr/lib/postgresql/*/bin``); when the
binaries are missing the fixture tries ``apt-get install -y postgresql`` once and skips the tests
if that fails too. PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user (``runuser``). It listens on 127.0.0.1 on a free port, trusts local
connections, keeps its data in a temporary directory, and is stopped after the module.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Search tests run many tiny forwards: one intra-op thread is faster (and fair on a shared machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def _install() -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env, capture_output=True, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    import shlex

    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a server started for these tests."""
    bindir = _pg_bin()
    if bindir is None:
        _install()
        bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin) and apt-get install failed")
    root = tempfile.mkdtemp(prefix="torchslim-pg-")
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chmod(root, 0o700)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    run = dict(check=True, capture_output=True, timeout=120)
    subprocess.run(_as_server_user([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync",
                                    "-E", "UTF8"]), **run)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run(_as_server_user([f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", log, "-w", "-t", "60", "start"]),
                   **run)
    try:
        deadline = time.time() + 30
        while True:  # wait until it accepts TCP connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
