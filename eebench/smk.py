"""Glue between Snakemake and the library: wildcard patterns, logging for ``script:`` entry points."""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


@contextmanager
def logged(snakemake: Any, append: bool = False) -> Iterator[None]:
    """Send the library's log to the rule's log file (and stderr); log errors without a traceback
    for the expected kinds (bad input), with one for anything else. ``append`` keeps what earlier
    attempts wrote (a resumed training job's log tells the whole story of the cell)."""

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="a" if append else "w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True
    )
    if append:
        logging.getLogger("eebench").info("--- %s job started (earlier attempts above) ---", snakemake.rule)
    try:
        yield
    except (ConfigError, DatasetError, DeclarationError, CorruptFileError, TrainingDiverged, FileNotFoundError) as err:
        logging.getLogger("eebench").error("%s", err)
        raise SystemExit(1) from None
    except Exception:
        logging.getLogger("eebench").error("unexpected error:\n%s", traceback.format_exc())
        raise


def job_config(snakemake: Any) -> dict[str, Any]:
    """What a job works with: its spec (``params.spec``, also its rerun trigger) and the runtime
    keys of the config it runs under (``eebench.specs``)."""
    return with_runtime(snakemake.params.spec, snakemake.config)


def cell(snakemake: Any):

    w = snakemake.wildcards
    return Cell(w.dataset, w.arch, w.variant, int(w.seed))
