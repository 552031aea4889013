"""Run independent training runs in worker processes (``zowarmup sweep --jobs``, benchmarks).

Each job is (config dict of one run, run folder); a worker trains it with the embedded runner
(:class:`~.loop.Runner`), or resumes it when the folder holds an unfinished run, and skips it when
the folder already holds a summary. Runs are independent and deterministic, so the results are the
same as running them one after the other.
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

__all__ = ["run_jobs"]

_DATA: dict = {}


def _one(cfg_dict: dict, run_dir: str) -> dict:
    from .config import from_dict, validate
    from .loop import CONFIG, SUMMARY, Runner, resume_run
    rd = Path(run_dir)
    if (rd / SUMMARY).exists():
        return json.loads((rd / SUMMARY).read_text())
    cfg = validate(from_dict(cfg_dict))
    key = (cfg.data.name, cfg.data.root)
    if key not in _DATA:
        from .. import data as zdata
        _DATA[key] = zdata.load_dataset(cfg.data.name, cfg.data.root)
    if (rd / CONFIG).exists():
        try:
            return resume_run(rd, progress=False, dataset=_DATA[key])
        except (FileNotFoundError, ValueError):
            import shutil
            shutil.rmtree(rd)  # started but never checkpointed: start again
    return Runner(cfg, rd, dataset=_DATA[key], progress=False).run()


def run_jobs(jobs: list, workers: int, done: Callable[[str, dict], None] | None = None) -> None:
    """Train every (RunConfig for one run, run folder) of ``jobs`` on ``workers`` processes
    (``workers <= 1``: in this process, in order); ``done(run_dir, summary)`` after each."""
    if workers <= 1:
        for cfg, rd in jobs:
            s = _one(cfg.to_dict(), str(rd))
            if done:
                done(str(rd), s)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
        futs = {ex.submit(_one, cfg.to_dict(), str(rd)): str(rd) for cfg, rd in jobs}
        for f in as_completed(futs):
            s = f.result()
            if done:
                done(futs[f], s)
