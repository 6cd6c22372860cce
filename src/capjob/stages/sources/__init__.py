"""Stage: read the configured dataset into a Ray Dataset, lazily.

Every layout ends as rows that carry the image in ``Source.image_column`` (raw bytes, an HF
``{bytes, path}`` struct, a path/URL string, base64 text; cells.py), an optional key column and
pass-through columns. Problems a user can fix (missing path, bucket, credentials or column, an
unreachable endpoint, a list-of-images column without an option) surface in ``preflight`` as one
SourceError line, in seconds, before Ray or any engine starts.

One module per layout (``data.format``), each holding that layout's rules:

* ``hf``           -- hf.py: hub id, local folder of data files (image-folder builder included)
                      or ``save_to_disk`` folder; ``data.split``, ``data.streaming``.
* ``parquet``      -- parquet.py: files or folders, local or any fsspec URL (``s3://...``);
                      img2dataset's URL lists are parquet with a URL column.
* ``image_folder`` -- image_folder.py: image files, recursive, local or remote.
* ``webdataset``   -- webdataset.py: tar shards, local or remote.
* ``json``         -- json_records.py: JSON array / JSON Lines files of records (LLaVA,
                      ShareGPT, LLaMA-Factory sets), image paths joined to ``data.image_root``.

Shared: storage.py (filesystems, per-protocol options, one-line errors), cells.py (what an image
cell holds, remote fetch with timeouts and retries), common.py (accounting, lists of images).

Remote storage: fsspec/s3fs with ``data.storage_options``; credentials come only from the
environment or the standard AWS/fsspec configuration (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``,
``~/.aws``), and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) selects an S3-compatible store.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from capjob.config import DataConfig, SourceFormat
from capjob.errors import SourceError
from capjob.stages.sources import hf, image_folder, json_records, parquet, webdataset
from capjob.stages.sources.cells import Fetcher
from capjob.stages.sources.sample import SAMPLE_COLUMNS, ensure_sample_dataset
from capjob.stages.sources.common import (Looked, Source, account, check_image_list, fill_columns, log, require_columns, select_images,
                                          skipped_totals, wanted_columns)
from capjob.stages.storage import check_storage_options, iter_files, open_file, probe

__all__ = ["Fetcher", "Source", "preflight", "read_source", "skipped_totals"]

# The key column of rows cut from a list of images: `<key>#<i>`.
IMAGE_KEY_COLUMN = "__image_key__"


def _resolved_columns(cfg: DataConfig) -> tuple[str, Optional[str]]:
    """(image column, key column) as the layout defines them."""
    if cfg.format == SourceFormat.image_folder:
        return "image", cfg.key_column or "path"  # an image file is its own key: its path
    if cfg.format == SourceFormat.webdataset:
        return cfg.image_column, cfg.key_column or "__key__"
    if cfg.format == SourceFormat.json:  # the record's field keeps its text; the row's image is the joined path
        return json_records.IMAGE_COLUMN, cfg.key_column or json_records.RECORD_KEY_COLUMN
    return cfg.image_column, cfg.key_column


def _check_columns(cfg: DataConfig, columns: list[str], looked: Optional[str] = None) -> None:
    image_column, key_column = _resolved_columns(cfg)
    require_columns(columns, DataConfig(**{**cfg.__dict__, "key_column": key_column}), image_column, looked)


def _wanted(cfg: DataConfig) -> list[str]:
    """Every column the job reads from the rows: image, key, pass-through."""
    image_column, key_column = _resolved_columns(cfg)
    return [c for _, c in wanted_columns(cfg, image_column, key_column)]


def _one_image_per_row(cfg: DataConfig) -> None:
    if cfg.image_index is not None or cfg.explode_images:
        option = "data.image_index" if cfg.image_index is not None else "data.explode_images"
        raise SourceError(f"{option}: data.format={cfg.format.value} has one image per row, not a list")


def _image_folder_has_images(cfg: DataConfig, kind: str) -> None:
    """Preflight: files in order (a lazy walk) until one is an image (image_folder's rule: an
    image extension, or bytes Pillow identifies) or the budget is spent (warned: the rest may
    hold images). SourceError when every file was looked at and none is an image."""
    assert cfg.path is not None
    looked = Looked("file")
    files = iter([cfg.path]) if kind == "file" else iter_files(cfg.path, cfg.storage_options, None)
    for url in files:
        looked.seen += 1
        if image_folder.extension(url) in image_folder.image_extensions():
            return
        try:
            with open_file(url, cfg.storage_options) as f:
                head = f.read(image_folder.SNIFF_BYTES)
        except Exception:  # noqa: BLE001 - unreadable now: the run fetches it again, with retries
            return
        looked.bytes += len(head)
        if image_folder.sniff_image(head):
            return
        if looked.spent():
            log.warning("data.path: %s and found no image yet; the run reads every file (files that are not images "
                        "are counted as skipped)", looked.describe(False))
            return
    if looked.seen:
        raise SourceError(f"data.path: no image under {cfg.path!r} (a file Pillow can open): {looked.describe(True)}")


def _inspect(cfg: DataConfig, deep: bool = False) -> tuple[str, Optional[pa.Schema], bool]:
    """(kind, schema (parquet's footers; None for the other layouts), image column holds lists)
    of a file-based layout, checked without Ray. `deep` (preflight): also read as much of the
    data as it takes to find an image and every wanted column (common.Looked)."""
    assert cfg.path is not None
    kind = probe(cfg.path, cfg.storage_options)
    wanted = _wanted(cfg)
    if cfg.format == SourceFormat.parquet:
        schema, looked = parquet.parquet_schema(cfg.path, cfg.storage_options, kind, wanted)
        _check_columns(cfg, list(schema.names), looked)
        return kind, schema, check_image_list(cfg, parquet.image_type(schema, cfg.image_column), repr(cfg.path))
    _one_image_per_row(cfg)
    if cfg.format == SourceFormat.webdataset:
        if deep:
            columns, looked = webdataset.preflight(cfg, kind, wanted)
            if columns is not None:  # None: no image within the budget (warned), the columns unknown
                _check_columns(cfg, columns, looked)
        return kind, None, False
    image_folder.preflight(cfg, kind)
    _check_columns(cfg, ["image", "path"])
    if deep:
        _image_folder_has_images(cfg, kind)
    return kind, None, False


def preflight(cfg: DataConfig) -> None:
    """Everything about the input a user can get wrong, checked without Ray: credentials kept out
    of the config, the path (or bucket, endpoint, access), the columns and their types (parquet
    footers, webdataset samples, a local HF dataset's features), and that there is an image at
    all. Where the first file or sample lacks an image or a column, preflight reads on, within a
    budget (common.Looked), and says how much it read in its error. Seconds, so that the job can
    fail before it starts Ray or any engine. (A hub dataset is checked by read_source, when it is
    opened.)"""
    check_storage_options(cfg.storage_options, "data.storage_options")
    if cfg.format == SourceFormat.sample:
        # Written on first use: its columns are known without writing it.
        require_columns(list(SAMPLE_COLUMNS), cfg, cfg.image_column)
        return
    if not cfg.path:
        raise SourceError(f"data.path: is required for data.format={cfg.format.value}")
    if cfg.format == SourceFormat.hf:
        if hf.hf_kind(cfg.path) != "hub":  # local: metadata only (memory-mapped / schema-inferred)
            loaded = hf.load_hf(cfg, streaming=hf.hf_kind(cfg.path) == "local")
            columns, looked = hf.preflight_columns(loaded, cfg.path, _wanted(cfg))
            require_columns(columns, cfg, cfg.image_column, looked)
            check_image_list(cfg, hf.image_type(loaded, cfg.image_column), repr(cfg.path))
        return
    if cfg.format == SourceFormat.json:
        json_records.preflight(cfg)
        return
    _inspect(cfg, deep=True)


def read_source(cfg: DataConfig, run_id: Optional[str] = None) -> Source:
    """The configured dataset, limited, with its image/key columns resolved and checked.

    With `run_id` (a run's ledger is up), layouts whose items can be skipped (image folders,
    webdatasets) count items seen and skipped per reason into the ledger (common.account)."""
    check_storage_options(cfg.storage_options, "data.storage_options")
    image_column, key_column = _resolved_columns(cfg)
    listed = False
    if cfg.format == SourceFormat.sample:
        path = ensure_sample_dataset(cfg.sample_size, cfg.sample_shapes)
        ds, num_rows = parquet.read_parquet(DataConfig(path=path, format=SourceFormat.parquet), "directory"), None
        description = f"capjob sample ({path})"
    elif cfg.format == SourceFormat.hf:
        ds, num_rows, columns, listed = hf.read_hf(cfg)
        description = f"Hugging Face dataset {cfg.path} [{cfg.split}]{' streaming' if cfg.streaming else ''}"
    elif cfg.format == SourceFormat.parquet:
        kind, schema, listed = _inspect(cfg)
        ds, num_rows = parquet.read_parquet(cfg, kind, schema), None
        description = f"parquet {cfg.path}"
    elif cfg.format == SourceFormat.image_folder:
        _inspect(cfg)
        ds, num_rows = image_folder.read_image_folder(cfg)
        ds = ds.map_batches(account, fn_kwargs={"run_id": run_id}, batch_format="pyarrow", batch_size=None)
        description = f"image folder {cfg.path}"
    elif cfg.format == SourceFormat.webdataset:
        _inspect(cfg, deep=True)  # what preflight found, kept (webdataset.preflight): no second read
        ds, num_rows = webdataset.read_webdataset(cfg, _wanted(cfg)), None
        ds = ds.map_batches(account, fn_kwargs={"run_id": run_id}, batch_format="pyarrow", batch_size=None)
        description = f"webdataset {cfg.path}"
    elif cfg.format == SourceFormat.json:
        listed = json_records.preflight(cfg)
        ds, num_rows = json_records.read_json_records(cfg, listed), None
        ds = ds.map_batches(account, fn_kwargs={"run_id": run_id}, batch_format="pyarrow", batch_size=None)
        description = f"JSON records {cfg.path}"
    else:  # pragma: no cover - the enum is exhaustive
        raise SourceError(f"data.format: unknown {cfg.format}")

    if cfg.format not in (SourceFormat.parquet, SourceFormat.sample):
        # Rows that lack a field other rows have (a sample without a member, a record without a
        # key) get null there: every block carries every column the job reads. (Parquet's reader
        # fills them from the footers' schema, which Ray then knows: the sink types nulls by it.)
        ds = ds.map_batches(fill_columns, fn_kwargs={"columns": dict.fromkeys(_wanted(cfg))}, batch_format="pyarrow", batch_size=None)
    if listed:
        keyed = IMAGE_KEY_COLUMN if key_column else None
        ds = ds.map_batches(select_images, batch_format="numpy", fn_kwargs={
            "image_column": image_column, "key_column": key_column, "image_index": cfg.image_index, "keyed_column": keyed})
        key_column = keyed or key_column
        if cfg.explode_images:
            num_rows = None
    if cfg.shuffle_seed is not None:
        ds = ds.random_shuffle(seed=cfg.shuffle_seed)
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
        # Unknown size: the limit is the plan's upper bound.
        num_rows = min(num_rows, cfg.limit) if num_rows is not None else cfg.limit
    return Source(
        dataset=ds,
        image_column=image_column,
        key_column=key_column,
        passthrough_columns=list(cfg.passthrough_columns),
        num_rows=num_rows,
        description=description,
    )
