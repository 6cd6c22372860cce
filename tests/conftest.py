import os

import pytest



# Ray's dashboard is on by default for a local run; in the tests (and the capjob processes they
# start) it is off: measured on 2 cores it triples ray.init (9.8 -> 29 s) and adds ~1 GiB of RSS
# to every Ray start-up (bench/dashboard_bench.py, docs/benchmarks.md).
os.environ.setdefault("CAPJOB_RAY_DASHBOARD", "0")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests share one capjob cache (tiny model, sample set) that is not the user's."""
    cache = os.environ.get("CAPJOB_TEST_CACHE") or str(tmp_path_factory.mktemp("capjob-cache"))
    os.environ["CAPJOB_CACHE"] = cache
    yield cache


# --- S3 (data in and out): a real S3-compatible HTTP server on 127.0.0.1 -------------------


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server in a subprocess (tests/helpers/s3server.py), for the whole session."""
    from helpers.s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def s3_auth():
    """A second server that checks credentials: every key is unknown to it (wrong credentials)."""
    from helpers.s3server import S3Server

    with S3Server(auth=True) as server:
        yield server


@pytest.fixture(scope="module")
def s3_env(s3):
    """This process talks to the `s3` server through the standard AWS variables (and so do the
    Ray workers and capjob subprocesses it starts); restored afterwards."""
    import s3fs

    s3.ensure_running()
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep another endpoint
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
