"""Resumable ``make bench``: the benchmark invocations a run has finished, so an interrupted run goes on.

``make bench`` runs for 9-10 hours on 2 cores, longer than one sitting. Each benchmark invocation (one
process, one result file) is recorded in ``bench/results/bench_progress.json`` (written atomically) when
it finishes: its place in the list, command, wall seconds, the highest 1-minute load average seen while
it ran, and the CPU it ran on (with the matmul flags that decide
whether it has native bfloat16). Run ``make bench`` again after an interruption and it skips what
finished and reruns the invocation that was cut short; a run that finished starts over. The record
sits beside the result files it vouches for, so committing both lets a run go on in another checkout
(a fresh clone, a machine that was restarted). No invocation runs for more than about an hour: the
long runs are split into their repeats (``bench.run_all.ARGUMENTS``), so little is lost to a cut.

The record is tied to the code the benchmarks run (a digest of ``bench/*.py``, ``sae_core/``,
``pyproject.toml`` and the pins): after a change there, resuming is refused, since the result files
would mix two versions of the code; ``--restart`` starts over. One kind of change is let through, and
recorded in the run's summary: to ``bench/`` modules that no finished invocation's process loaded (a
benchmark not reached yet, the driver itself), so none of the results ran a line of it (:func:`amend`,
``python -m bench.run_all --amend REV --reason ...``).

Benchmarks measure throughput and want the machine to themselves: an invocation during which the load
average went above :data:`SHARED_LOAD` (its own work is about one per core) is named as measured on a
shared machine, in the log and in the run's summary. When every invocation has finished, the summary
(per-invocation seconds, total, interruptions) is written to ``bench/results/make_bench.json``, and
only then is the run marked finished.

Written by hand: nothing in the libraries we use records progress across processes for a list of
shell commands (``make`` would need one target file per invocation and cannot refuse a changed code base).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = ROOT / "bench" / "results" / "bench_progress.json"
SHARED_LOAD = 3.0  # 1-minute load average above which an invocation did not have the 2 cores to itself
CODE = ("bench/*.py", "sae_core/**/*.py", "pyproject.toml", "constraints.txt", "bench/requirements-saedashboard.txt")


def _code_paths(root: Path) -> list[Path]:
    """The files the benchmarks run (:data:`CODE`), in sorted order."""
    return sorted({p for pattern in CODE for p in root.glob(pattern) if p.is_file()})


def code_digest(root: Path = ROOT) -> str:
    """SHA-256 over the files the benchmarks run (paths and contents, in sorted order)."""
    digest = hashlib.sha256()
    for path in _code_paths(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_files(root: Path = ROOT) -> dict[str, str]:
    """SHA-256 of each file :func:`code_digest` covers, by its path relative to ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in _code_paths(root)}


def _loaded_by(root: Path, modules: set[str]) -> set[str]:
    """The ``bench`` modules that running ``modules`` loads: them and what they import from ``bench``, transitively."""
    loaded, todo = set(), list(modules)
    while todo:
        name = todo.pop()
        if name in loaded or not (root / "bench" / f"{name}.py").is_file():
            continue
        loaded.add(name)
        for direct, plain, listed in re.findall(r"^\s*(?:from bench\.(\w+) import|import bench\.(\w+)|from bench import (.+)$)",
                                                (root / "bench" / f"{name}.py").read_text(encoding="utf-8"), re.M):
            todo += [direct or plain] if direct or plain else [part.split()[0] for part in listed.strip("()").split(",") if part.strip()]
    return loaded


def amend(path: Path, base: Path, reason: str, planned: Sequence[Sequence[str]], root: Path = ROOT) -> dict[str, Any]:
    """Carry the unfinished run in ``path`` over a change no finished invocation ran; the amendment is recorded.

    ``base`` holds the code the run was recorded with (its :func:`code_digest` is the record's); ``planned`` is the
    run's list of commands (without the interpreter). Every benchmarked file that differs between ``base`` and
    ``root`` must be a ``bench/`` module that no finished invocation's process loaded (its module and what that
    imports from ``bench``, in ``base``), and every finished invocation must still be planned as it ran. Anything
    else (``sae_core/``, the pins, a module a finished benchmark ran) is refused (``SystemExit`` naming ``--restart``).
    """
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("finished_at"):
        raise SystemExit(f"{path} holds a finished make bench run: nothing to amend (the next run starts over)")
    if code_digest(base) != record["digest"]:
        raise SystemExit(f"{base} does not hold the code the run in {path} was recorded with (its digest differs): "
                         "name the revision the record was last written at")
    old, new = code_files(base), code_files(root)
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    if not changed:
        raise SystemExit("no benchmarked file differs from the record's code: nothing to amend")
    loaded = _loaded_by(base, {run["command"][1].removeprefix("bench.") for run in record["runs"]})
    for file in changed:
        match = re.fullmatch(r"bench/(\w+)\.py", file)
        if not match or match[1] in loaded:
            why = f"a finished invocation ran bench.{match[1]}" if match else "finished invocations ran it"
            raise SystemExit(f"{file} changed and {why}: the results would mix two versions of the code. "
                             "Run `python -m bench.run_all --restart` to start over.")
    moved = [run["number"] for run in record["runs"]
             if run["number"] > len(planned) or list(planned[run["number"] - 1]) != run["command"]]
    if moved:
        raise SystemExit(f"finished invocations {moved} are no longer planned as they ran: "
                         "run `python -m bench.run_all --restart` to start over")
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_digest": record["digest"], "to_digest": code_digest(root),
             "files": changed, "after_invocations": len(record["runs"]), "reason": reason}
    record.setdefault("amendments", []).append(entry)
    record["digest"] = entry["to_digest"]
    BenchProgress(path, record)._save()
    logger.info("amended the make bench record in %s: %s (%s)", path, ", ".join(changed), reason)
    return entry


@contextmanager
def load_watch(every: float = 15.0) -> Iterator[dict[str, float]]:
    """Samples the 1-minute load average every ``every`` seconds while the context runs; ``["max"]``."""
    seen = {"max": os.getloadavg()[0]}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            seen["max"] = max(seen["max"], os.getloadavg()[0])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        seen["max"] = max(seen["max"], os.getloadavg()[0])


class BenchProgress:
    """The finished invocations of one ``make bench`` run, kept in ``path``."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record

    @classmethod
    def open(cls, path: Path = PROGRESS, digest: str | None = None, restart: bool = False) -> BenchProgress:
        """The run in ``path`` to go on with, or a new one (none there, ``restart``, or the last one finished).

        Refuses (``SystemExit`` naming the fix) a run recorded with other code than ``digest``.
        """
        digest = digest or code_digest()
        if path.exists() and not restart:
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path} is not a readable make bench record ({error}); run "
                                 "`python -m bench.run_all --restart` to start over") from None
            if not saved.get("finished_at"):
                if saved.get("digest") != digest:
                    raise SystemExit(
                        f"{path} holds an unfinished make bench run of other code (bench/, sae_core/ or the pins changed "
                        f"since it started at {saved.get('started_at')}, {len(saved.get('runs', []))} invocations done): "
                        "its results would mix two versions. Run `python -m bench.run_all --restart` to start over.")
                saved["resumed"] = saved.get("resumed", 0) + 1
                logger.info("resuming make bench from %s: %d invocations done", path, len(saved["runs"]))
                return cls(path, saved)
        return cls(path, {"digest": digest, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": 0,
                          "runs": [], "finished_at": None})

    @staticmethod
    def key(command: Sequence[str]) -> list[str]:
        """The command without its interpreter (a worktree's python and the main one run the same invocation)."""
        return list(command[1:])

    def done(self, number: int, command: Sequence[str]) -> bool:
        """Whether invocation ``number`` (1-based place in the run's list) with ``command`` has finished."""
        return any(run.get("number") == number and run["command"] == self.key(command) for run in self.record["runs"])

    def run(self, number: int, command: Sequence[str], execute: Callable[[Sequence[str]], None]) -> dict[str, Any]:
        """``execute(command)`` timed and load-watched, recorded (atomically) once it returns."""
        started = time.perf_counter()
        with load_watch() as load:
            execute(command)
        entry = {"number": number, "command": self.key(command), "seconds": round(time.perf_counter() - started, 1),
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_max": round(load["max"], 2),
                 "shared_machine": load["max"] > SHARED_LOAD, "cpu": _cpu_model()}
        if entry["shared_machine"]:
            logger.warning("%s ran while the load average reached %.1f (> %.1f): the machine was shared, and the run's "
                           "summary will say so; for clean timings, `python -m bench.run_all --restart` on an idle "
                           "machine", " ".join(entry["command"]), load["max"], SHARED_LOAD)
        self.record["runs"].append(entry)
        self._save()
        return entry

    def summary(self) -> dict[str, Any]:
        """The run's summary for ``bench/results/make_bench.json`` (write it, then :meth:`finish`)."""
        from bench.common import git_commit

        runs = self.record["runs"]
        return {"commit": git_commit(), "started_at": self.record["started_at"],
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": self.record["resumed"],
                "digest": self.record["digest"], "benchmark_seconds": round(sum(run["seconds"] for run in runs), 1),
                "cpus": sorted({run.get("cpu") or "not recorded" for run in runs}),
                "shared_machine": [" ".join(run["command"]) for run in runs if run["shared_machine"]], "runs": runs,
                "amendments": self.record.get("amendments", [])}

    def finish(self) -> None:
        """Mark the run finished (after its summary is written: a cut in between leaves it resumable)."""
        self.record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save()

    def _save(self) -> None:
        from sae_core.files import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.record)


def _cpu_model() -> str:
    from bench.common import cpu_kind, machine_info

    return cpu_kind(machine_info())
