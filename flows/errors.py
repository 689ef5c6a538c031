"""User-facing errors of the CLI: one line naming the cause and the fix; the full trace goes to a log file.

`explain(error)` turns the failures a user can fix (a missing file, a missing third-party package, no Ray
cluster at `--address`, a port in use, a bad value) into one sentence, or returns None for a bug (which keeps
its traceback). `quiet_console()` stops Prefect's console handler from printing the tracebacks of
failed task and flow runs (they stay in the Prefect server's flow-run logs), so the console shows the one line;
the CLI writes that error's own full traceback to `log_file()`.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from dataprep.errors import FieldError
from dataprep.ingest.inputs import InputError
from flows._env import forgeline_home
from flows.config import ConfigError
from workers.ray_runtime import ClusterUnavailableError

EXTRAS = {"s3fs": "s3", "profanity_check": "labels", "gcsfs": None, "adlfs": None}
LOG_NAME = "forgeline.log"


class PortInUseError(OSError):
    """The HTTP port asked for is already taken."""


def _missing_module(error: ImportError) -> str:
    name = error.name or ""
    if not name:  # fsspec: "Install s3fs to access S3"
        name = next((module for module in EXTRAS if module in str(error)), "")
    extra = EXTRAS.get(name.split(".")[0])
    fix = f"pip install 'forgeline[{extra}]'" if extra else f"pip install {name or 'the missing package'}"
    return f"missing optional package {name or '?'} ({error}): {fix}"


def root_cause(error: BaseException) -> BaseException:
    """The user's exception inside Ray's task wrappers (RayTaskError keeps it as `cause`)."""
    seen = 0
    while seen < 5 and type(error).__name__.startswith("RayTaskError") and getattr(error, "cause", None):
        error = getattr(error, "cause")  # noqa: B009  (RayTaskError only)
        seen += 1
    return error


OUR_PACKAGES = ("dataprep", "workers", "flows", "serving", "benchmarks", "tests")


def explain(error: BaseException) -> str | None:
    """One line for an error the user can fix, None for anything else."""
    error = root_cause(error)
    if isinstance(error, ImportError):
        module = (error.name or "").split(".")[0]
        fsspec_style = not module and any(name in str(error) for name in EXTRAS)
        missing = isinstance(error, ModuleNotFoundError) and module and module not in OUR_PACKAGES
        return _missing_module(error) if fsspec_style or missing else None  # else a bug in our imports
    if isinstance(error, FileNotFoundError):
        name = error.filename or ""
        return f"not found: {name} ({error.strerror or error})" if name else f"not found: {error}"
    if isinstance(error, (InputError, ConfigError, FieldError, ClusterUnavailableError, PortInUseError,
                          ValueError)):
        return str(error)
    return None


def log_file(run_dir: Path | None = None) -> Path:
    """Where the CLI writes full traces: `<run_dir>/logs/forgeline.log`, or under $FORGELINE_HOME."""
    directory = (Path(run_dir) if run_dir is not None else forgeline_home()) / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / LOG_NAME


class _NoTraceback(logging.Formatter):
    """Formats a copy of the record without its traceback (the record itself is shared by other handlers)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not record.exc_info and not record.exc_text:
            return self.inner.format(record)
        bare = copy.copy(record)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


BOILERPLATE = ("Beginning flow run", "Beginning subflow run", "Finished in state Completed()", "Created task run",
               "Executing '")


class _NoBoilerplate(logging.Filter):
    """Drops Prefect's per-run start/finish lines on the console: the stage's own lines (published, skipped,
    counts) say the same; failures and everything else pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith(BOILERPLATE))


def quiet_console() -> None:
    """Prefect's console handlers print failed runs' messages without tracebacks (FORGELINE_TRACEBACKS=1 keeps
    them) and without the per-run start/finish boilerplate; other handlers (the API's run logs) are untouched."""
    if os.environ.get("FORGELINE_TRACEBACKS") == "1":
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # Prefect puts it on the root logger
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter))
                handler.addFilter(_NoBoilerplate())


TRACE_LOGGER = "forgeline.errors"


def attach_log_file(run_dir: Path | None) -> Path:
    """Full records (tracebacks included) of Prefect's loggers and of `TRACE_LOGGER` (which writes nowhere
    else) appended to `log_file(run_dir)`."""
    path = log_file(run_dir)
    target = str(path.resolve())
    logging.getLogger(TRACE_LOGGER).propagate = False
    for name in ("prefect", TRACE_LOGGER):
        logger = logging.getLogger(name)
        if any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
            continue
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return path


def log_trace(message: str) -> None:
    """The current exception's traceback into the log file only (never the console)."""
    logger = logging.getLogger(TRACE_LOGGER)
    logger.propagate = False
    logger.error(message, exc_info=True)
