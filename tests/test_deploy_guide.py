"""docs/deploy.md runs as written: every shell block, in order, in one bash, as root, on
free loopback ports in a temporary directory (the guide's own variables, set through the
environment), with a home of its own. Everything it started is stopped by its pid file
at the end, also when a step fails.

The test reads the guide; its steps are never copied here. What it changes: the ports
and the directory (the guide's defaults, `: "${VAR:=...}"`, give way to the environment),
and `custodes` on PATH, which runs this checkout with this test's interpreter."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import BINARIES, _free_port, unavailable

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "deploy.md"
FENCE = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)
NEEDED = (
    Path("/usr/bin/patroni"),
    Path("/usr/bin/patronictl"),
    Path("/usr/bin/etcd"),
    Path("/usr/bin/etcdctl"),
    Path("/sbin/start-stop-daemon"),
    Path("/usr/bin/curl"),
    Path("/usr/bin/openssl"),
    Path("/usr/bin/psql"),
    Path("/usr/sbin/nginx"),
    BINARIES / "initdb",
)
GUIDE_TIMEOUT = 240.0


def guide_script() -> str:
    blocks = FENCE.findall(GUIDE.read_text("utf-8"))
    assert len(blocks) >= 8, "the guide's shell blocks were not found"
    return "set -euo pipefail\n" + "\n".join(blocks)


@contextlib.contextmanager
def deploy_directory() -> Iterator[Path]:
    """A directory the guide's services (run as etcd and postgres) can reach; everything
    in it started is stopped by pid at the end, and it is removed."""
    # Not under pytest's base directory: it is private to root.
    root = Path(tempfile.mkdtemp(prefix="custodes-deploy-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        deploy = root / "deploy"
        pids = [
            int(text)
            for pid_file in deploy.glob("*.pid")
            if (text := pid_file.read_text().strip()).isdigit()
        ]
        pids += [
            int(first)
            for postmaster in deploy.glob("node*/data/postmaster.pid")
            if (first := postmaster.read_text().split("\n", 1)[0].strip()).isdigit()
        ]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_the_deployment_guide_runs_as_written() -> None:
    if os.geteuid() != 0:
        pytest.skip("the deployment guide is run as root (it starts services as their users)")
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        unavailable(f"not installed: {', '.join(missing)}")
    script = guide_script()
    with deploy_directory() as root:
        home = root / "home"
        home.mkdir(mode=0o700)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "custodes"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m custodes "$@"\n')
        wrapper.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTODES_", "PG"))}
        env.update(
            {
                "HOME": str(home),
                "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "PYTHONPATH": str(REPO / "src"),
                "DEPLOY": str(root / "deploy"),
                **{
                    name: str(_free_port())
                    for name in (
                        "HTTPS_PORT",
                        "APP_PORT",
                        "ETCD_PORT",
                        "ETCD_PEER_PORT",
                        "PG1_PORT",
                        "PG2_PORT",
                        "REST1_PORT",
                        "REST2_PORT",
                    )
                },
            }
        )
        ran = subprocess.run(
            ["bash", "-c", script],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=GUIDE_TIMEOUT,
            check=False,
        )
        logs = ""
        if ran.returncode != 0:
            for log in sorted((root / "deploy").glob("*.log")):
                logs += f"\n--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
        assert ran.returncode == 0, f"{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}{logs}"
        # custodes reached around the proxy refused (421); through nginx over HTTPS the
        # login page, the API refusing without a session and answering a token, and the
        # login page again after the switchover. (Each wait in the guide fails it when
        # what it waits for never comes: node2 leading after the switchover, for one.)
        codes = re.findall(r"^(\d{3})$", ran.stdout, re.M)
        assert codes == ["421", "200", "401", "200", "200"], ran.stdout
        assert re.search(r"^strict-transport-security: max-age=", ran.stdout, re.M | re.I)
