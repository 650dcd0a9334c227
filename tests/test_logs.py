"""Rule logs: a retried training job adds to its log instead of replacing the cancelled attempt's."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from eebench import smk


def _job(log_path):
    return SimpleNamespace(log=[str(log_path)], rule="train")


def test_training_log_keeps_earlier_attempts(tmp_path):
    """Snakemake deletes an incomplete job's log before its rerun; the resumed job's log still
    begins with the cancelled attempts' lines, and the attempts' file goes once the job succeeds."""
    log_path, state = tmp_path / "logs" / "seed0.log", tmp_path / "state"
    for attempt in ("first attempt, cancelled", "second attempt, cancelled"):
        with pytest.raises(SystemExit), smk.logged(_job(log_path), attempts_dir=state):
            logging.getLogger("eebench").info(attempt)
            raise SystemExit(143)  # as on SIGTERM
        log_path.unlink()  # what Snakemake does before the rerun
    with smk.logged(_job(log_path), attempts_dir=state):
        logging.getLogger("eebench").info("third attempt, resumed to the end")
    text = log_path.read_text()
    assert text.index("first attempt") < text.index("second attempt") < text.index("third attempt")
    assert text.count("train job started") == 3 and not (state / smk.ATTEMPTS_LOG).exists()


def test_other_logs_start_afresh(tmp_path):
    log_path = tmp_path / "evaluate.log"
    for message in ("old run", "new run"):
        with smk.logged(_job(log_path)):
            logging.getLogger("eebench").info(message)
    assert "old run" not in log_path.read_text() and "new run" in log_path.read_text()


def test_expected_errors_exit_1_and_are_logged(tmp_path):
    log_path = tmp_path / "x.log"
    with pytest.raises(SystemExit) as info, smk.logged(_job(log_path)):
        raise FileNotFoundError("results/x.pt: file not found")
    assert info.value.code == 1 and "results/x.pt: file not found" in log_path.read_text()
