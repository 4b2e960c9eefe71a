"""``make bench`` is resumable: an interrupted run reruns only what had not finished, never mixes code versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import progress as progress_module
from bench import run_all
from bench.progress import BenchProgress, code_digest

ALL = [command[1:] for name in run_all.BENCHES for command in run_all.invocations(name)]


class Interrupted(Exception):
    pass


def _executor(calls: list[list[str]], fail_at: int | None = None):
    def execute(command):
        if fail_at is not None and len(calls) == fail_at:
            calls.append(list(command[1:]))
            raise Interrupted
        calls.append(list(command[1:]))
    return execute


FIRST_STORE_ADD = next(place for place, command in enumerate(ALL) if "--add-repeats" in command)


@pytest.mark.parametrize("cut_at", [FIRST_STORE_ADD, FIRST_STORE_ADD + 1])  # the second: between the store's two identical --add-repeats
def test_an_interrupted_run_goes_on_from_the_invocation_cut_short(tmp_path: Path, cut_at: int) -> None:
    path, first, second = tmp_path / "progress.json", [], []
    with pytest.raises(Interrupted):
        run_all.run_benchmarks(run_all.BENCHES, BenchProgress.open(path, "code-1"), execute=_executor(first, cut_at))
    saved = json.loads(path.read_text())  # written after every finished invocation, readable after the interruption
    assert [run["command"] for run in saved["runs"]] == ALL[:cut_at]
    assert [run["number"] for run in saved["runs"]] == list(range(1, cut_at + 1))
    assert all(run["seconds"] >= 0 and "load_max" in run and "cpu" in run for run in saved["runs"])
    progress = BenchProgress.open(path, "code-1")
    run_all.run_benchmarks(run_all.BENCHES, progress, execute=_executor(second))
    assert first == ALL[:cut_at + 1] and second == ALL[cut_at:]  # the cut-short one runs again, the finished ones do not
    summary = progress.summary()
    progress.finish()
    assert [run["command"] for run in summary["runs"]] == ALL and summary["resumed"] == 1
    assert summary["benchmark_seconds"] == pytest.approx(sum(run["seconds"] for run in summary["runs"]), abs=0.5)
    again = BenchProgress.open(path, "code-1")  # a finished run is not resumed: the next one starts over
    assert again.record["runs"] == [] and not again.done(1, ["python", *ALL[0]])


def test_a_cut_before_the_summary_is_written_leaves_the_run_resumable(tmp_path: Path) -> None:
    path, calls = tmp_path / "progress.json", []
    progress = BenchProgress.open(path, "code-1")
    run_all.run_benchmarks(run_all.BENCHES, progress, execute=_executor(calls))
    progress.summary()  # make_bench.json would be written from this; the process dies before finish()
    resumed = BenchProgress.open(path, "code-1")
    assert len(resumed.record["runs"]) == len(ALL) and resumed.record["resumed"] == 1
    run_all.run_benchmarks(run_all.BENCHES, resumed, execute=_executor(again := []))
    assert again == []  # nothing reruns: only the summary is written again


def test_a_corrupt_record_is_refused_naming_restart(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    path.write_text('{"digest": "code-1", "runs": [')
    with pytest.raises(SystemExit, match="not a readable make bench record.*--restart"):
        BenchProgress.open(path, "code-1")
    assert BenchProgress.open(path, "code-1", restart=True).record["runs"] == []


def test_the_long_runs_go_one_repeat_an_invocation_each_after_the_one_that_writes_the_file() -> None:
    for name, flag, writer in (("training_speed_measured", "--add-to-existing", "bench.training_speed_measured"),
                               ("store_long_run", "--add-repeats", "bench.bench_activations")):
        commands = [command for bench in run_all.BENCHES for command in run_all.invocations(bench)]
        for place, command in enumerate(commands):
            if flag in command:  # adds to a result file: an earlier invocation wrote it, with the same settings
                writes = [c for c in commands[:place] if c[2] == writer and flag not in c]
                assert writes, command
                if name == "training_speed_measured":
                    same = [c for c in writes if c[c.index("--precisions") + 1] == command[command.index("--precisions") + 1]]
                    assert same and same[-1][same[-1].index("--repeats") + 1] == "1"
    assert run_all.invocations("store_long_run", quick=True) == []  # no smoke size: it adds to the full result


def test_resuming_with_other_code_is_refused_and_restart_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    with pytest.raises(Interrupted):
        run_all.run_benchmarks(run_all.BENCHES, BenchProgress.open(path, "code-1"), execute=_executor([], 2))
    with pytest.raises(SystemExit, match="other code.*--restart"):
        BenchProgress.open(path, "code-2")
    assert BenchProgress.open(path, "code-2", restart=True).record["runs"] == []


def test_a_shared_machine_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module.os, "getloadavg", lambda: (progress_module.SHARED_LOAD + 1.5, 0.0, 0.0))
    entry = BenchProgress.open(tmp_path / "p.json", "c").run(1, ["python", "-m", "bench.x"], lambda command: None)
    assert entry["shared_machine"] and entry["load_max"] == progress_module.SHARED_LOAD + 1.5
    monkeypatch.setattr(progress_module.os, "getloadavg", lambda: (1.9, 0.0, 0.0))
    assert not BenchProgress.open(tmp_path / "q.json", "c").run(1, ["python", "-m", "bench.x"], lambda c: None)["shared_machine"]


def test_the_code_digest_follows_the_benchmarked_code_only(tmp_path: Path) -> None:
    for name, text in {"bench/a.py": "x = 1", "sae_core/sub/b.py": "y = 2", "README.md": "r",
                       "bench/results/r.json": "{}", "constraints.txt": "torch==2"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = code_digest(tmp_path)
    (tmp_path / "README.md").write_text("changed")
    (tmp_path / "bench/results/r.json").write_text('{"new": 1}')
    assert code_digest(tmp_path) == before  # docs and results are outputs, not inputs
    (tmp_path / "sae_core/sub/b.py").write_text("y = 3")
    assert code_digest(tmp_path) != before


def test_make_bench_without_the_saedashboard_venv_stops_before_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from bench import bench_browser

    monkeypatch.setattr(bench_browser, "SD_PYTHON", tmp_path / "absent" / "python")
    ran: list = []
    monkeypatch.setattr(run_all, "run_benchmarks", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(sys, "argv", ["run_all", "--only", "bench_whitening", "bench_browser"])
    with pytest.raises(SystemExit, match="SAEDashboard.*make bench"):
        run_all.main()
    assert ran == []  # found out before hours of other benchmarks, not after


def test_the_table_says_how_long_make_bench_took(tmp_path: Path, monkeypatch) -> None:
    progress = BenchProgress.open(tmp_path / "p.json", "c")
    for number, (seconds, command) in enumerate(((3000.0, ["python", "-m", "bench.a"]),
                                                 (4500.0, ["python", "-m", "bench.b", "--x"])), 1):
        progress.run(number, command, lambda c: None)
        progress.record["runs"][-1]["seconds"] = seconds  # as if each had run that long
    under_way = run_all.make_bench_line(None, progress.record)
    assert "2 of" in under_way and "2 h 5 min" in under_way and "under way" in under_way
    assert "--restart" in under_way  # recorded with digest "c": not this code, so it cannot go on
    with monkeypatch.context() as patch:
        patch.setattr(run_all, "code_digest", lambda: "c")
        assert "--restart" not in run_all.make_bench_line(None, progress.record)
    summary = progress.summary()
    progress.finish()
    line = run_all.make_bench_line(summary, progress.record)
    assert summary["benchmark_seconds"] == 7500.0 and "2 invocations, 2 h 5 min of benchmarks" in line
    assert "none on a shared machine" in line
    assert "resumed 0 times" in line and "resumed once" in run_all.make_bench_line({**summary, "resumed": 1})
    later = BenchProgress.open(tmp_path / "p.json", "c")  # the next run, under way: the table says so
    later.record["started_at"] = "9999"  # started after the finished one
    later.run(1, ["python", "-m", "bench.a"], lambda c: None)
    assert "1 of" in run_all.make_bench_line(summary, later.record)
    assert "not finished" in run_all.make_bench_line(None)


def test_a_cpu_without_native_bfloat16_leaves_the_bfloat16_invocations_to_one_that_has_it(tmp_path: Path) -> None:
    path, here, there = tmp_path / "progress.json", [], []
    everything = [["python", *command] for command in ALL]
    bfloat16 = [command[1:] for command in everything if run_all.times_bfloat16(command)]
    left = run_all.run_benchmarks(run_all.BENCHES, BenchProgress.open(path, "code-1"), execute=_executor(here),
                                  leave=run_all.times_bfloat16)
    assert here == [command for command in ALL if command not in bfloat16] and [c[1:] for c in left] == bfloat16
    assert ["-m", "bench.training_speed_measured", "--tokens", "1048576", "--repeats", "1", "--precisions", "float32"] in here
    assert not any("bfloat16" in part for command in here for part in command)
    progress = BenchProgress.open(path, "code-1")  # not finished: the CPU with bfloat16 goes on with the same record
    assert progress.record["resumed"] == 1 and len(progress.record["runs"]) == len(here)
    line = run_all.make_bench_line(None, progress.record)
    assert f"{len(here)} of {len(ALL)} invocations done" in line and f"{len(bfloat16)} of those to go time bfloat16" in line
    assert run_all.run_benchmarks(run_all.BENCHES, progress, execute=_executor(there)) == []
    assert there == bfloat16  # exactly the ones left, in the run's order, each once
    assert sorted(run["number"] for run in progress.summary()["runs"]) == list(range(1, len(ALL) + 1))
    for place, command in enumerate(ALL):  # a repeat that adds to a result file is left with the one that wrote it
        if "--add-to-existing" in command or "--add-repeats" in command:
            writer = "bench.training_speed_measured" if "--add-to-existing" in command else "bench.bench_activations"
            writes = [c for c in ALL[:place] if c[1] == writer and "--add-to-existing" not in c]
            assert (command in bfloat16) == (writes[-1] in bfloat16), command


def test_the_benchmarks_said_to_time_no_bfloat16_do_not_mention_it() -> None:
    root = Path(run_all.__file__).parent
    for name in run_all.BENCHES:  # their sources: a benchmark that starts timing bfloat16 must join TIMES_BFLOAT16
        source = (root / f"{name}.py").read_text() + (root / "bench_browser_peer.py").read_text() * (name == "bench_browser")
        if name in run_all.TIMES_BFLOAT16:
            assert "bfloat16" in source or "lr_sweep" in source, name  # quality_sweep: the default run's "auto"
        elif name not in ("bench_precision", "training_speed_measured"):  # these two: per their arguments
            assert "bfloat16" not in source, name


BASE = {"bench/common.py": "X = 1\n", "bench/bench_a.py": "from bench.common import X\n",
        "bench/bench_b.py": "from bench import common as c\n", "bench/bench_c.py": "Y = 2\n", "sae_core/m.py": "Z = 3\n"}
PLANNED = [["-m", "bench.bench_a"], ["-m", "bench.bench_b"], ["-m", "bench.bench_c"]]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _record_after_a(tmp_path: Path) -> tuple[Path, Path]:
    base = _tree(tmp_path / "base", BASE)
    path = tmp_path / "progress.json"
    BenchProgress.open(path, code_digest(base)).run(1, ["python", *PLANNED[0]], lambda command: None)
    return base, path


def test_a_fix_to_a_benchmark_no_finished_invocation_ran_is_let_through_and_recorded(tmp_path: Path) -> None:
    base, path = _record_after_a(tmp_path)
    root = _tree(tmp_path / "root", {**BASE, "bench/bench_b.py": "from bench import common as c  # fixed\n"})
    entry = progress_module.amend(path, base, "fix b", PLANNED, root=root)
    assert entry["files"] == ["bench/bench_b.py"] and entry["from_digest"] == code_digest(base) != entry["to_digest"]
    resumed = BenchProgress.open(path, code_digest(root))  # goes on with the fixed code, the finished run kept
    assert resumed.done(1, ["python", *PLANNED[0]]) and not resumed.done(2, ["python", *PLANNED[1]])
    summary = resumed.summary()
    assert summary["amendments"] == [entry]
    assert "after 1 invocations, before any ran the changed bench/bench_b.py: fix b" in run_all.make_bench_line(summary)


@pytest.mark.parametrize("changed", ["bench/bench_a.py", "bench/common.py", "sae_core/m.py"])  # ran, imported by it, core
def test_a_change_a_finished_invocation_ran_is_refused(tmp_path: Path, changed: str) -> None:
    base, path = _record_after_a(tmp_path)
    root = _tree(tmp_path / "root", {**BASE, changed: BASE[changed] + "# changed\n"})
    before = path.read_text()
    with pytest.raises(SystemExit, match="--restart"):
        progress_module.amend(path, base, "r", PLANNED, root=root)
    assert path.read_text() == before
    with pytest.raises(SystemExit, match="other code"):
        BenchProgress.open(path, code_digest(root))


def test_an_amend_from_other_code_or_with_a_finished_invocation_replanned_is_refused(tmp_path: Path) -> None:
    base, path = _record_after_a(tmp_path)
    root = _tree(tmp_path / "root", {**BASE, "bench/bench_c.py": "Y = 3\n"})
    with pytest.raises(SystemExit, match="digest differs"):
        progress_module.amend(path, root, "r", PLANNED, root=root)
    with pytest.raises(SystemExit, match=r"\[1\] are no longer planned"):
        progress_module.amend(path, base, "r", [[*PLANNED[0], "--new"], *PLANNED[1:]], root=root)


def test_amend_names_a_revision_git_cannot_archive() -> None:
    with pytest.raises(SystemExit, match="git archive no-such-revision failed.*name a commit"):
        run_all.amend_record("no-such-revision", "r")


def test_every_benchmark_module_imports() -> None:  # a module make bench reaches last must not fail hours in
    import importlib

    for name in run_all.BENCHES:
        assert callable(importlib.import_module(f"bench.{name}").main), name
