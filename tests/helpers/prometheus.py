"""A real Prometheus server (Debian's `prometheus`) on 127.0.0.1, started by the tests.

Without the binary the tests that query it are skipped with the reason (outside CI; in CI, an error)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

MISSING = "prometheus is not installed (apt-get install prometheus; .ci/run does)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, config_yaml: str, workdir) -> None:
        binary = shutil.which("prometheus")
        self.proc = None
        if binary is None:
            # The README's test command needs nothing installed by hand: without Debian's prometheus
            # the run goes on unscraped, and each test that queries Prometheus is skipped with this
            # reason (query, metric_names). CI installs it (.ci/run) and must run those tests, so
            # there (CI set) a missing binary is an error.
            if os.environ.get("CI"):
                raise RuntimeError(MISSING)
            return
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(config_yaml)
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("prometheus did not become ready")

    def _require(self) -> None:
        if self.proc is None:
            pytest.skip(MISSING)

    def query(self, promql: str) -> list[dict]:
        self._require()
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.load(urllib.request.urlopen(url, timeout=10))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def metric_names(self) -> set[str]:
        self._require()
        body = json.load(urllib.request.urlopen(f"{self.url}/api/v1/label/__name__/values", timeout=10))
        return set(body["data"])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
