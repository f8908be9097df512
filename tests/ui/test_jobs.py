"""Background jobs: what the thread prints goes to its log, errors come back through wait()."""

from __future__ import annotations

import threading

import pytest

from slothbook.ui.jobs import Job


def test_thread_output_goes_to_the_log_and_other_threads_print_as_usual(capsys):
    log, started, release = [], threading.Event(), threading.Event()

    def work():
        print("from the job")
        started.set()
        release.wait(5)
        return 42

    job = Job(work, log=log.append).start()
    started.wait(5)
    print("from the cell")  # while the job runs
    release.set()
    assert job.wait(5) == 42
    assert "".join(log) == "from the job\n"
    assert capsys.readouterr().out == "from the cell\n"


def test_a_logging_handler_made_before_the_job_writes_the_jobs_warnings_to_its_log(capsys):
    import logging
    import sys

    logger = logging.getLogger("slothbook.test_jobs")
    handler = logging.StreamHandler(sys.stderr)  # as transformers makes its own at import, before any job
    logger.addHandler(handler)
    logger.propagate = False
    try:
        log = []
        Job(lambda: logger.warning("from a library in the job"), log=log.append).start().wait(5)
        logger.warning("from the cell")
    finally:
        logger.removeHandler(handler)
    assert "".join(log) == "from a library in the job\n"
    assert capsys.readouterr().err == "from the cell\n"


def test_errors_are_kept_passed_to_on_done_and_raised_by_wait():
    seen = []

    def fail():
        raise ValueError("bad input")

    job = Job(fail, on_done=lambda j: seen.append(type(j.error).__name__)).start()
    with pytest.raises(ValueError, match="bad input"):
        job.wait(5)
    assert seen == ["ValueError"] and not job.running


def test_wait_with_a_timeout_says_the_job_still_runs():
    release = threading.Event()
    job = Job(lambda: release.wait(5)).start()
    with pytest.raises(TimeoutError, match="still running"):
        job.wait(0.05)
    release.set()
    job.wait(5)
