"""What a person sees while capjob runs: the plan, one live progress line, the summary.

Everything else a run prints (Ray's and vLLM's logs, the C++ core worker's lines, Ray Data's
progress bars, warnings of the libraries) goes to `<run dir>/capjob.log`. The redirect is at the
file-descriptor level (dup2 of fds 1 and 2), because much of that output does not pass through
Python: Ray's core worker writes to fd 2 from C++, and the processes a local Ray starts inherit
the driver's descriptors. capjob's own lines go to copies of the original descriptors.

`job.log_level=info` (or `debug`) keeps the old behaviour: everything on the console, at that level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional, TextIO

LOG_FILE = "capjob.log"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Levels at which the libraries' output stays on the console.
VERBOSE_LEVELS = ("debug", "info")

_out: Optional[TextIO] = None  # the console while a quiet session redirects fds 1 and 2
_err: Optional[TextIO] = None
log_path: Optional[str] = None
# A sweep job's session: `out` goes to its capjob.log too, `headline` lines (its plan and its
# progress) to the console, each after _prefix ("job 3: ").
_brief = False
_prefix = ""

log = logging.getLogger("capjob")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the message is the one line the user sees. A KeyboardInterrupt, so
    that a sweep stops too rather than recording the run as failed and starting the next."""


def process_seconds() -> Optional[float]:
    """Seconds since this process started (the command), or None where psutil cannot tell."""
    try:
        import psutil

        return time.time() - psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - a log marker, never worth failing the run
        return None


def startup_mark(phase: str) -> None:
    """Log one start-up phase done, with the seconds since the command started, to capjob.log
    (INFO): the start-up timeline of docs/benchmarks.md ("Start-up timeline (session 9)") is
    read from these lines."""
    since = process_seconds()
    log.info("start-up +%s s: %s", f"{since:.1f}" if since is not None else "?", phase)


def out(text: str = "") -> None:
    """A line for the console (in a sweep job's brief session: for its capjob.log)."""
    stream = sys.stdout if _brief else (_out or sys.stdout)
    stream.write(text + "\n")
    stream.flush()


def headline(text: str, end: str = "\n") -> None:
    """A line for the console in any session, a sweep job's (prefixed with the job) included."""
    stream = _out or sys.stdout
    stream.write(_prefix + text + end)
    stream.flush()


def brief(full: str, line: str) -> None:
    """`full` on the console of a run; in a sweep job's brief session `line` there and `full`
    in the job's capjob.log."""
    out(full)
    if _brief:
        headline(line)


def error(text: str) -> None:
    sys.stdout.flush()
    stream = _err or sys.stderr
    stream.write(text + "\n")
    stream.flush()


def is_terminal() -> bool:
    stream = _out or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _ConsoleHandler(logging.Handler):
    """capjob's warnings and errors as `capjob: warning: ...` lines on the console."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            error(f"capjob: {record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


@contextlib.contextmanager
def session(run_dir: str, level: str = "warning", brief_prefix: Optional[str] = None, shutdown_ray: bool = True) -> Iterator[None]:
    """Route the run's output: capjob's lines to the console, the rest to <run_dir>/capjob.log.
    brief_prefix (a sweep's jobs, e.g. "job 3: "): only the headline lines reach the console,
    after that prefix; the plan, summary and everything else go to the log. shutdown_ray=False
    (capjob-watch, whose runs share one Ray): Ray stays up when the session ends."""
    global _out, _err, log_path, _brief, _prefix
    level = level.lower() if level.lower() in LOG_LEVELS else "warning"  # validate() names a bad one
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, LOG_FILE)
    log_file = open(log_path, "a", buffering=1)
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if level in VERBOSE_LEVELS:
        logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s", force=True)
        logging.getLogger().addHandler(file_handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(file_handler)
            log_file.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    _err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers = [file_handler]
    root.setLevel(logging.INFO)
    console_handler = _ConsoleHandler(level=getattr(logging, level.upper()))
    log.addHandler(console_handler)
    _brief, _prefix = brief_prefix is not None, brief_prefix or ""
    try:
        yield
    except Exception:
        traceback.print_exc(file=log_file)  # the console gets one line (cli.py); the log the whole story
        raise
    finally:
        if shutdown_ray:
            _shutdown_ray()  # before the fds are restored: Ray's log thread still prints worker lines
        log.removeHandler(console_handler)
        root.handlers, root.level = old_handlers, old_level
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _out.close()
        _err.close()
        _out = _err = None
        _brief, _prefix = False, ""
        log_file.close()


def _shutdown_ray() -> None:
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C during shutdown: exit anyway
        pass


def quiet() -> bool:
    """True while the libraries' output goes to the log file (Ray Data's progress bars off)."""
    return _out is not None


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def progress_line(captioned: int, quarantined: int, total: Optional[int], rate: Optional[float]) -> str:
    """`captioned 12 / 36 · 1.4 images/s · ETA 17 s · quarantined 0` (total: rows this run has to
    do, None when the source's size is unknown; rate: images/s, None before the first caption)."""
    parts = [f"captioned {captioned}" + (f" / {total}" if total is not None else "")]
    parts.append(f"{rate:.2f} images/s" if rate is not None else "waiting for the first caption")
    if rate and total is not None:
        parts.append(f"ETA {format_seconds(max(0, total - captioned - quarantined) / rate)}")
    parts.append(f"quarantined {quarantined}")
    return " · ".join(parts)


class Progress:
    """One live progress line from the run's ledger (counts per block, see metrics.py).

    On a terminal the line is rewritten in place every second. Elsewhere (CI logs, pipes) a
    line is printed at each quarter of the work done (with the size unknown, once a minute), so
    that a log holds a handful of lines.
    `totals` returns the ledger's counters; `total_rows` the source's rows (None: unknown).
    """

    WINDOW_S = 30.0  # images/s over the last 30 s: the steady rate, not the start-up's average
    HEARTBEAT_S = 60.0  # off a terminal, with the size unknown: a line a minute

    def __init__(self, totals: Callable[[], dict[str, int]], total_rows: Optional[int], interval_s: float = 1.0):
        self._totals = totals
        self._total_rows = total_rows
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capjob-progress", daemon=True)
        self._samples: list[tuple[float, int]] = []
        self._tty = is_terminal()
        self._printed_quarter = 0
        self._last_print = time.monotonic()
        self.last: dict[str, int] = {}

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if exc_type is None:
            self._tick(final=True)  # the last counts, which the last tick may have missed
        if self._tty and self._samples:
            (_out or sys.stdout).write("\n")  # ends the line rewritten in place

    def counts(self) -> tuple[int, int, Optional[int]]:
        t = self.last
        captioned = t.get("captioned", 0)
        quarantined = t.get("images_rejected", 0) + t.get("rejected:engine", 0)
        total = self._total_rows - t.get("skipped", 0) if self._total_rows is not None else None
        return captioned, quarantined, total

    def rate(self) -> Optional[float]:
        """Images/s over the last WINDOW_S seconds; None before the first caption."""
        if not self._samples or self._samples[-1][1] == 0:
            return None
        now, latest = self._samples[-1]
        start_t, start_n = next(s for s in self._samples if now - s[0] <= self.WINDOW_S)
        return (latest - start_n) / (now - start_t) if now > start_t else None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._tick()

    def _tick(self, final: bool = False) -> None:
        try:
            self.last = self._totals()
        except Exception:  # noqa: BLE001 - the ledger may be busy; next tick
            return
        captioned, quarantined, total = self.counts()
        self._samples.append((time.monotonic(), captioned))
        line = progress_line(captioned, quarantined, total, self.rate())
        if self._tty:
            stream = _out or sys.stdout
            stream.write("\r\x1b[K" + _prefix + line)
            stream.flush()
        elif _brief:  # a sweep job, off a terminal: its last line only
            if final:
                headline(line)
        elif total:
            quarter = min(4, 4 * (captioned + quarantined) // total)
            if quarter > self._printed_quarter or (final and self._printed_quarter < 4):
                self._printed_quarter = max(quarter, self._printed_quarter + final)
                out(line)
        elif final or time.monotonic() - self._last_print >= self.HEARTBEAT_S:
            self._last_print = time.monotonic()
            out(line)
