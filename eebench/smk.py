"""Glue between Snakemake and the library: wildcard patterns, logging for ``script:`` entry points."""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import Cell, ConfigError
from .datasets import DatasetError, DeclarationError
from .io import CorruptFileError
from .posthoc import POSTHOC
from .specs import with_runtime
from .training import TrainingDiverged


def alternatives(names: Iterable[str]) -> str:
    """A regex matching exactly one of the configured names (a wildcard constraint)."""
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


def posthoc_needs_train_split(method: str) -> bool:

    return POSTHOC.get(method).needs_train_split


ATTEMPTS_LOG = "attempts.log"  # in a resumable job's state folder: the log of every attempt so far


@contextmanager
def logged(snakemake: Any, attempts_dir: str | Path | None = None) -> Iterator[None]:
    """Send the library's log to the rule's log file (and stderr); log errors without a traceback
    for the expected kinds (bad input), with one for anything else. With ``attempts_dir`` (a
    resumable job's state folder) the log also goes to ``attempts_dir/attempts.log``, and the rule's
    log starts with what earlier attempts wrote there: Snakemake deletes an incomplete job's log
    before its rerun, and a resumed training job's log should tell the whole story of the cell.
    The attempts' file is removed when the job succeeds."""

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    attempts = None if attempts_dir is None else Path(attempts_dir) / ATTEMPTS_LOG
    if snakemake.log:
        log_path = Path(snakemake.log[0])
        if attempts is not None:
            attempts.parent.mkdir(parents=True, exist_ok=True)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(attempts.read_text() if attempts.exists() else "")
            handlers.append(logging.FileHandler(attempts, mode="a"))
        handlers.append(logging.FileHandler(log_path, mode="a" if attempts is not None else "w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True
    )
    if attempts is not None:
        logging.getLogger("eebench").info("--- %s job started (earlier attempts above) ---", snakemake.rule)
    try:
        yield
    except (ConfigError, DatasetError, DeclarationError, CorruptFileError, TrainingDiverged, FileNotFoundError) as err:
        logging.getLogger("eebench").error("%s", err)
        raise SystemExit(1) from None
    except Exception:
        logging.getLogger("eebench").error("unexpected error:\n%s", traceback.format_exc())
        raise
    if attempts is not None:
        logging.shutdown()
        attempts.unlink(missing_ok=True)


def job_config(snakemake: Any) -> dict[str, Any]:
    """What a job works with: its spec (``params.spec``, also its rerun trigger) and the runtime
    keys of the config it runs under (``eebench.specs``)."""
    return with_runtime(snakemake.params.spec, snakemake.config)


def cell(snakemake: Any):

    w = snakemake.wildcards
    return Cell(w.dataset, w.arch, w.variant, int(w.seed))
