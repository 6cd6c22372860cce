"""A real S3-compatible HTTP server on 127.0.0.1 for the tests: moto's server mode, the way
s3fs's own test suite runs it, in a subprocess on a free port.

    with S3Server() as s3:            # or the `s3` fixture (tests/conftest.py)
        s3.fs.mkdir("bucket")          # an s3fs.S3FileSystem talking to it
        env = s3.env()                 # AWS_* variables for capjob subprocesses

``S3Server(auth=True)`` starts a second kind of server that checks credentials (moto's IAM
authentication from the first request on): any key it was not told about is rejected with
InvalidAccessKeyId, like a wrong key on AWS.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, auth: bool = False, port: Optional[int] = None):
        self.auth = auth
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self._fs = None

    def start(self, timeout: float = 60.0) -> "S3Server":
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen(
            cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            # Its own session: a test that signals its own process group (or a child's) never
            # takes the session-wide server down with it.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).read()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout:.0f}s")

    def ensure_running(self) -> "S3Server":
        """Start the server again, on the same endpoint, if its process has exited (the buckets
        are gone then: every test makes its own)."""
        if self.proc is None or self.proc.poll() is not None:
            self._fs = None
            self.start()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, **extra: str) -> dict[str, str]:
        """The variables a process needs to use this server through the standard AWS chain."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            **extra,
        }

    @property
    def fs(self):
        """An s3fs filesystem on this server (its own instance: no cached listings)."""
        if self._fs is None:
            import s3fs

            self._fs = s3fs.S3FileSystem(
                key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": self.endpoint},
                skip_instance_cache=True, use_listings_cache=False,
            )
        return self._fs

    def bucket(self, name: str) -> str:
        if not self.fs.exists(name):
            self.fs.mkdir(name)
        return name

    def reset(self) -> None:
        """Forget every bucket (moto's reset API)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10).read()
