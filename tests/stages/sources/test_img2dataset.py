"""img2dataset's URL shards (issue 31, case 6), without Ray or an engine: parquet written by pandas
as img2dataset's inputs are (upper-case ``URL``/``TEXT``, the index as ``__index_level_0__``, a
``sha256`` column), img2dataset's X-Robots-Tag rule, and data.verify_hash_column, against a local
HTTP server (tests/helpers/httpserver.py)."""

from __future__ import annotations

import hashlib
import urllib.parse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from capjob.config import CaptionConfig, DataConfig, FetchConfig, SourceFormat, to_typed
from capjob.errors import ConfigError, SourceError
from capjob.preflight import check_prompt_columns, data_with_prompt_columns
from capjob.schema import ImageRejected
from capjob.stages.ids import label_rows
from capjob.stages.sources import cells, parquet, preflight
from capjob.stages.sources.cells import FetchSkipped, Fetcher, disallowing_directive, expected_digest, resolve_rows
from capjob.stages.sources.common import SKIPPED_COUNTER
from helpers.config import compose
from helpers.httpserver import LocalHTTPServer
from helpers.iolayouts import make_rows

ROWS = make_rows(4, seed=31)
FAST = FetchConfig(retries=0, backoff_s=0.01, connect_timeout_s=2, read_timeout_s=2, concurrency=4)


@pytest.fixture(scope="module")
def http():
    with LocalHTTPServer({n: b for n, b, _ in ROWS}) as server:
        yield server


def robots_url(http, value: str, name: str) -> str:
    return f"{http.url}/robots/{urllib.parse.quote(value, safe='')}/{name}"


def write_url_shard(path, urls: list[str], hashes: list, hash_column: str = "sha256"):
    """A URL list as img2dataset reads it: pandas, index=True (a filtered frame keeps its index)."""
    frame = pd.DataFrame({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))], hash_column: hashes})
    frame.index = pd.Index(range(100, 100 + len(urls)))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=True)
    return path


# --- column names as given ----------------------------------------------------------------------


def test_pandas_url_shard_columns_work_as_given(tmp_path):
    shard = write_url_shard(tmp_path / "urls" / "00000.parquet", ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"],
                            [None, None])
    schema, _ = parquet.parquet_schema(str(shard), {}, "file")
    assert schema.names == ["URL", "TEXT", "sha256", "__index_level_0__"]
    cfg = DataConfig(format=SourceFormat.parquet, path=str(tmp_path / "urls"), image_column="URL", passthrough_columns=["TEXT"])
    preflight(cfg)  # the index column is neither in the way nor taken for an image
    preflight(DataConfig(**{**cfg.__dict__, "key_column": "__index_level_0__"}))
    # Names are case-sensitive, taken as given: the lower-case spelling names no column.
    with pytest.raises(SourceError, match=r"data.image_column: column 'url' not in the dataset \(looked at all 1 parquet file \(2 rows\)\); available columns: .*'URL'"):
        preflight(DataConfig(**{**cfg.__dict__, "image_column": "url"}))
    # As Ray Data reads the file: the index is a column like any other.
    batch = {c: np.asarray(v, dtype=object) for c, v in pq.read_table(shard).to_pydict().items()}
    ids, keys = label_rows(batch, "URL", "__index_level_0__")
    assert keys == ["100", "101"] and all(i.startswith(k + "#") for i, k in zip(ids, keys))


# --- X-Robots-Tag ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values, expected", [
    (["noai"], "noai"),
    (["NoImageAI"], "noimageai"),
    (["noindex, nofollow"], "noindex"),
    (["nofollow", "noimageindex"], "noimageindex"),      # several headers
    (["otherbot: noai"], None),                          # another robot's directive
    (["capjob: noai"], "noai"),                          # ours: the User-Agent's product token
    (["googlebot: noindex", "all"], None),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
    ([], None),
])
def test_robots_rule_is_img2datasets(values, expected):
    assert disallowing_directive(values, FetchConfig()) == expected


def test_robots_directives_and_token_follow_the_config():
    assert disallowing_directive(["noindex"], FetchConfig(robots_directives=["noai"])) is None
    assert disallowing_directive(["mybot: noai"], FetchConfig(user_agent="MyBot/2.0 (+https://example.org)")) == "noai"


def test_robots_header_skips_the_row_and_the_switch_turns_it_off(http):
    name, data = ROWS[0][0], ROWS[0][1]
    urls = [robots_url(http, "noai", name), robots_url(http, "otherbot: noimageai|capjob: noimageai", name),
            robots_url(http, "otherbot: noai", name), f"{http.url}/img/{name}"]
    got = Fetcher(fetch=FAST).get_many(urls)
    assert [g.reason if isinstance(g, ImageRejected) else g for g in got] == ["robots: noai", "robots: noimageai", data, data]
    assert all(isinstance(g, FetchSkipped) for g in got[:2])
    off = FetchConfig(**{**FAST.__dict__, "respect_robots": False})
    assert Fetcher(fetch=off).get_many(urls) == [data] * 4


# --- data.verify_hash_column and the skip accounting ------------------------------------------------


def test_expected_digest_reads_hex_text_and_raw_digests():
    digest = hashlib.sha256(b"x").digest()
    assert expected_digest(" " + digest.hex().upper() + "\n") == digest.hex()
    assert expected_digest(digest) == digest.hex()
    assert expected_digest(None) is None and expected_digest(float("nan")) is None and expected_digest("") is None


def test_resolve_rows_checks_hashes_and_counts_robots_skips(http, monkeypatch):
    recorded = {}
    monkeypatch.setattr(cells.metrics, "record_many", lambda run_id, key, counts: recorded.update({(run_id, key): counts}))
    (n0, b0, _), (n1, b1, _), (n2, b2, _), _ = ROWS
    good, wrong = hashlib.sha256(b0).hexdigest(), hashlib.sha256(b"other").hexdigest()
    batch = {
        "id": np.asarray(["a", "b", "c", "d", "e"], dtype=object),
        "URL": np.asarray([f"{http.url}/img/{n0}", f"{http.url}/img/{n1}", f"{http.url}/img/{n2}",
                           robots_url(http, "noai", n0), f"{http.url}/status/404"], dtype=object),
        "sha256hash": np.asarray([good.upper(), wrong, None, good, good], dtype=object),
    }
    got = resolve_rows(batch, "URL", Fetcher(fetch=FAST, hash_column="sha256hash"), "run-1")
    assert got[0] == b0 and got[2] == b2  # right digest (any case); a null digest is not checked
    assert got[1].reason == f"hash_mismatch: expected {wrong}, got {hashlib.sha256(b1).hexdigest()}"
    assert got[3] is None  # skipped: counted, neither a row nor quarantined
    assert got[4].reason.startswith("fetch: 404")  # a failed fetch keeps its own reason
    [(key, counts)] = recorded.items()
    assert key[0] == "run-1" and key[1].startswith("fetch-")
    assert counts == {"read": -1, SKIPPED_COUNTER + "robots: noai": 1}
    # Without a hash column nothing is checked; without skips nothing is recorded.
    recorded.clear()
    assert resolve_rows({**batch, "URL": batch["URL"][:3], "id": batch["id"][:3]}, "URL", Fetcher(fetch=FAST), "run-1") == [b0, b1, b2]
    assert recorded == {}


def test_verify_hash_column_is_read_passed_through_and_checked_in_preflight(tmp_path):
    shard = write_url_shard(tmp_path / "urls" / "00000.parquet", ["http://127.0.0.1:9/a.jpg"], ["00" * 32], "sha256hash")
    data = DataConfig(format=SourceFormat.parquet, path=str(shard), image_column="URL", passthrough_columns=["TEXT"],
                      verify_hash_column="sha256hash")
    assert data_with_prompt_columns(data, CaptionConfig()).passthrough_columns == ["TEXT", "sha256hash"]
    check_prompt_columns(data, CaptionConfig())
    missing = DataConfig(**{**data.__dict__, "verify_hash_column": "sha256"})
    with pytest.raises(SourceError, match=r"^data.verify_hash_column: column 'sha256' not in the dataset \(looked at all 1 parquet file \(1 row\)\); available columns: "):
        check_prompt_columns(missing, CaptionConfig())


def test_fetch_options_are_validated():
    cfg = compose(["dataset=parquet", "data.path=x", "data.image_column=URL", "data.fetch.robots_directives=[noai,'otherbot: noai']"])
    with pytest.raises(ConfigError, match="data.fetch.robots_directives"):
        to_typed(cfg)
    with pytest.raises(ConfigError, match="data.verify_hash_column: names the image column itself"):
        to_typed(compose(["dataset=parquet", "data.path=x", "data.image_column=URL", "data.verify_hash_column=URL"]))
