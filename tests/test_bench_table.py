"""The README's benchmark tables are what ``bench.run_all`` writes from ``bench/results``, nothing typed by hand."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from bench import run_all


def _section(text: str, start: str, end: str) -> str:
    found = re.search(re.escape(start) + "\n(.*?)\n" + re.escape(end), text, re.S)
    assert found, f"README.md lost its {start} ... {end} markers"
    return found.group(1)


def test_readme_tables_are_regenerated_from_the_result_files():
    readme = (run_all.ROOT / "README.md").read_text(encoding="utf-8")
    assert _section(readme, run_all.START, run_all.END) == run_all.table(), "run `python -m bench.run_all --table-only`"
    assert _section(readme, run_all.QUALITY_START, run_all.QUALITY_END) == run_all.quality_table()


@pytest.mark.parametrize("precision,label", [("bfloat16", ""), ("float32", ""), ("bfloat16", "_static_shapes")])
def test_measured_speed_rows_match_ratios_recomputed_from_the_raw_runs(precision, label):
    path = run_all.RESULTS / f"training_speed_measured_{precision}{label}.json"
    if not path.exists():
        pytest.skip(f"{path.name} not measured yet")
    result = json.loads(path.read_text())
    rows = run_all.training_speed_measured_rows(result)
    for peer, row in zip(("saelens", "saelens_compiled"), rows, strict=True):
        ratios = [run[f"ours_{precision}"]["tokens_per_s"] / run[f"{peer}_{precision}"]["tokens_per_s"]
                  for run in result["runs"]]
        assert len(ratios) == result["repeats"]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[3] == f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        ours = statistics.median(run[f"ours_{precision}"]["tokens_per_s"] for run in result["runs"])
        assert cells[1] == f"{ours:,.0f}"


def test_make_bench_runs_every_precision_the_table_reads():
    commands = run_all.invocations("training_speed_measured")
    precisions = [command[command.index("--precisions") + 1] for command in commands]
    assert sorted(set(precisions)) == ["bfloat16", "float32"]  # one file each: training_speed_measured_<precision>.json
    assert all(command[command.index("--tokens") + 1] == "1048576" for command in commands)
    for precision in ("bfloat16", "float32"):  # the repeats the table shows: each invocation's, added up
        repeats = sum(int(c[c.index("--repeats") + 1]) for c, p in zip(commands, precisions, strict=True) if p == precision)
        mine = [c[1:] for c, p in zip(commands, precisions, strict=True) if p == precision]
        progress = run_all._load("bench_progress")  # a make bench committed part-way: the repeats it has run so far
        if progress and not progress.get("finished_at") and any(r["command"] == mine[0] for r in progress["runs"]):
            repeats = sum(int(r["command"][r["command"].index("--repeats") + 1]) for r in progress["runs"]
                          if r["command"] in mine)
        path = run_all.RESULTS / f"training_speed_measured_{precision}.json"
        if path.exists():
            assert repeats == json.loads(path.read_text())["repeats"]
    assert run_all.invocations("bench_whitening", quick=True)[0][-1] == "--quick"


def test_added_repeats_join_the_file_they_match_and_nothing_else(tmp_path):
    from bench import training_speed_measured as measured

    rates = [{"ours": 2400.0, "saelens": 1500.0, "saelens_compiled": 1600.0},
             {"ours": 2450.0, "saelens": 1400.0, "saelens_compiled": 1700.0}]
    runs = [{f"{row}_float32": {"tokens_per_s": rate} for row, rate in r.items()} for r in rates]
    path = tmp_path / "training_speed_measured_float32.json"
    path.write_text(json.dumps({"tokens_per_run": 1048576, "precisions": ["float32"], "runs": runs[:1], "repeats": 1,
                                "written_at": "2026-12-06T04:03:10", "command": "first", "wall_seconds": 10.0}))
    earlier, batches = measured.existing_repeats(path, 1048576, ["float32"])
    assert earlier == runs[:1] and batches[0]["repeats"] == 1 and batches[0]["command"] == "first"
    summary = measured.summarise(earlier + runs[1:], ["float32"])
    ratios = [r["ours"] / r["saelens"] for r in rates]  # taken within each repeat, then the median
    assert summary["ours_float32_vs_saelens_float32"]["median"] == pytest.approx(statistics.median(ratios))
    assert summary["rates_float32"]["saelens_compiled"]["min"] == 1600.0
    for tokens, precisions in ((65536, ["float32"]), (1048576, ["bfloat16"])):
        with pytest.raises(SystemExit, match="pass the same --tokens / --precisions"):
            measured.existing_repeats(path, tokens, precisions)
    with pytest.raises(SystemExit, match="does not exist"):
        measured.existing_repeats(tmp_path / "missing.json", 1048576, ["float32"])


def test_store_long_run_rows_match_ratios_recomputed_from_its_repeats():
    from bench import store_long_run

    result = json.loads((run_all.RESULTS / "bench_activations.json").read_text())
    long = result["long_run_bfloat16"]
    runs = store_long_run.as_runs(long)
    [first] = run_all.invocations("bench_activations")  # what `make bench` runs: its long run, then the added repeats
    adds = [command[1:] for command in run_all.invocations("store_long_run")]
    added = sum(int(c[c.index("--add-repeats") + 1]) for c in adds)
    assert int(first[first.index("--long-repeats") + 1]) + added == store_long_run.LONG_REPEATS
    expected = store_long_run.LONG_REPEATS
    progress = run_all._load("bench_progress")  # a make bench committed part-way: the repeats it has added so far
    if progress and not progress.get("finished_at") and any(r["command"] == first[1:] for r in progress["runs"]):
        done = [r["command"] for r in progress["runs"] if r["command"] in adds]
        expected = int(first[first.index("--long-repeats") + 1]) + sum(int(c[c.index("--add-repeats") + 1]) for c in done)
    assert len(runs) == expected
    rows = run_all.long_run_rows(long)
    pairs = [("ours_compiled_compile_counted", "saelens_compiled_compile_counted"),
             ("ours_compiled_compile_counted", "saelens_eager"), ("ours_eager", "saelens_eager")]
    for (ours, peer), row in zip(pairs, rows, strict=True):
        ratios = [run[ours]["tokens_per_s"] / run[peer]["tokens_per_s"] for run in runs]  # within each repeat
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[3] == f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        assert cells[1] == f"{statistics.median(run[ours]['tokens_per_s'] for run in runs):,.0f}"
        assert cells[4] == f"reported ({len(runs)} interleaved repeats)"
    orders = [run["order"] for run in runs]
    assert all(sorted(order) == sorted(store_long_run.CASES) for order in orders)
    assert orders[0] != orders[1]  # the order alternates, so a drift favours neither side


def test_store_long_run_repeats_join_only_a_file_of_the_same_tokens(tmp_path):
    from bench import store_long_run

    one = {case: {"tokens": 10, "seconds": 1.0, "tokens_per_s": rate}
           for case, rate in zip(store_long_run.CASES, (3600.0, 3400.0, 2400.0, 2100.0), strict=True)}
    path = tmp_path / "bench_activations.json"
    path.write_text(json.dumps({"written_at": "2026-12-06T06:00:00",
                                "long_run_bfloat16": {"target_tokens": 1048576, **one}}))  # a file from before repeats
    long = store_long_run.existing(path, 1048576)["long_run_bfloat16"]
    assert store_long_run.as_runs(long)[0]["ours_eager"]["tokens_per_s"] == 2400.0
    assert long["measured"] == [{"written_at": "2026-12-06T06:00:00", "repeats": 1, "commit": None,
                                 "command": "python -m bench.bench_activations"}]
    later = {**one, "ours_eager": {"tokens": 10, "seconds": 1.0, "tokens_per_s": 2000.0}}
    summary = store_long_run.summarise([*store_long_run.as_runs(long), later])
    assert summary["ratio_eager"]["values"] == pytest.approx([2400 / 2100, 2000 / 2100])
    assert summary["ratio_eager"]["median"] == pytest.approx(statistics.median([2400 / 2100, 2000 / 2100]))
    with pytest.raises(SystemExit, match="pass --tokens 1048576"):
        store_long_run.existing(path, 65536)
    with pytest.raises(SystemExit, match="does not exist"):
        store_long_run.existing(tmp_path / "missing.json", 1048576)
    path.write_text(json.dumps({"written_at": "2026-12-06T06:00:00"}))
    with pytest.raises(SystemExit, match="no long_run_bfloat16"):
        store_long_run.existing(path, 1048576)


def test_same_context_quality_rows_match_medians_recomputed_from_the_seeds():
    path = run_all.RESULTS / "quality_same_contexts.json"
    if not path.exists():
        pytest.skip(f"{path.name} not measured yet")
    result = json.loads(path.read_text())
    repeats = result["repeats"]
    sides = ("ours_on_saelens_contexts", "ours_run_together")
    values = {  # read from the per-seed scores, not from the file's summary
        "saelens_format": lambda r: r["saelens_format"]["explained_variance"],
        "explained_variance": lambda r: r["explained_variance"], "ce_recovered": lambda r: r["ce_recovered"]}
    rows = run_all.same_contexts_rows(result)
    assert len(rows) == 3 * len(sides)
    for s, side in enumerate(sides):
        assert [r["seed"] for r in repeats["saelens"]] == [r["seed"] for r in repeats[side]]
        for (name, value), row in zip(values.items(), rows[3 * s:3 * s + 3], strict=True):
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            ours = [value(r) for r in repeats[side]]
            peer = [value(r) for r in repeats["saelens"]]
            assert cells[1] == f"{statistics.median(ours):.3f} ({min(ours):.3f}-{max(ours):.3f})", name
            assert cells[2] == f"{statistics.median(peer):.3f} ({min(peer):.3f}-{max(peer):.3f})", name
            assert cells[5] == ("yes" if statistics.median(ours) >= min(peer) else "no"), name


def test_precision_entries_show_auto_picking_the_faster_forward():
    """Each kind of CPU measured: ``"auto"`` chose bfloat16 exactly where its forward outran float32."""
    result = run_all._load("precision")
    if result is None:
        pytest.skip("bench/results/precision.json not measured yet (python -m bench.bench_precision)")
    for kind, entry in result["kinds"].items():
        measured = entry["forward_tokens_per_s"]
        ratios = [b / f for b, f in zip(measured["bfloat16"]["values"], measured["float32"]["values"], strict=True)]
        assert measured["bfloat16_over_float32"]["median"] == pytest.approx(statistics.median(ratios), rel=1e-3)
        assert entry["auto_chooses"] == ("bfloat16" if "native half: bfloat16" in kind else "float32")
        assert (entry["auto_chooses"] == "bfloat16") == (statistics.median(ratios) > 1), kind


def test_an_analysis_case_whose_process_died_is_named_in_its_row_with_the_signal() -> None:
    import signal
    import subprocess
    import sys

    from bench.bench_analysis import child_failure

    died = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
                          capture_output=True, text=True, check=False)
    dense = {"kind": "similarity_dense", "n": 65536}
    failure = child_failure(dense, died.returncode, died.stderr)
    assert died.returncode == -signal.SIGSEGV and failure["signal"] == "SIGSEGV" and failure["error"]
    assert "numpy/numpy#19685" in failure["note"]  # the dense product past 2**31 outputs: the known syrk crash
    assert "note" not in child_failure({**dense, "n": 16384}, died.returncode, died.stderr)
    exited = child_failure(dense, 1, "Traceback ...\nMemoryError\n")
    assert exited == {"returncode": 1, "error": "Traceback ...\nMemoryError"}
    cases = {"similarity_blocked_n65536": {"seconds": 44.6, "peak_rss_mb": 458.0},
             "similarity_dense_n65536": {"kind": "similarity_dense", **failure}}
    row = next(r for r in run_all.analysis_rows({"cases": cases}) if "65,536 latents" in r)
    assert "44.6 s, 458 MB" in row and "failed (SIGSEGV: numpy sends A @ A.T to BLAS syrk" in row
    assert row.split(" | ")[3] == "–"  # no ratio against a reference that did not finish


def test_a_labelled_measurement_gets_rows_of_its_own_naming_label_and_commit(tmp_path, monkeypatch):
    """``--label``: its own file, rows that say it was measured apart from the make bench run; absent, no row."""
    from bench import training_speed_measured as measured

    monkeypatch.setattr(measured, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(measured, "write_result", lambda name, record: _write(tmp_path, name, record))
    monkeypatch.setattr(measured, "run_in_fresh_process", lambda row, p, tokens: {"tokens_per_s": {"ours": 30.0}.get(row, 10.0)})
    monkeypatch.setattr(measured, "git_commit", lambda: "abc1234")
    monkeypatch.setattr("sys.argv", ["x", "--tokens", "1048576", "--label", "static_shapes"])
    measured.main()
    result = json.loads((tmp_path / "training_speed_measured_bfloat16_static_shapes.json").read_text())
    assert not (tmp_path / "training_speed_measured_bfloat16.json").exists()  # the make bench file is left alone
    rows = run_all.training_speed_measured_rows(result)
    assert len(rows) == 2 and all("`static_shapes` (commit abc1234, after the `make bench` run)" in r for r in rows)
    assert "| 30 | 10 | 3.00 (3.00-3.00) | >= 1.8x | yes |" in rows[0]
    monkeypatch.setattr("sys.argv", ["x", "--label", "static shapes"])
    with pytest.raises(SystemExit):
        measured.main()
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)  # the table finds every labelled file, and only those
    (tmp_path / "training_speed_measured_bfloat16_other.json").write_text(json.dumps({**result, "label": "other"}))
    (tmp_path / "training_speed_measured_bfloat16_unlabelled.json").write_text(json.dumps({**result, "label": None}))
    assert run_all.labelled_measurements() == ["training_speed_measured_bfloat16_other",
                                               "training_speed_measured_bfloat16_static_shapes"]
    table = run_all.table()
    assert table.count("`static_shapes` (commit") == 2 and table.count("`other` (commit") == 2
    (tmp_path / "training_speed_measured_bfloat16_static_shapes.json").unlink()
    assert "static_shapes" not in run_all.table()  # not measured: no "not run yet" row for it


def _write(directory, name, record):
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def test_ab_versions_alternates_the_two_commits_and_reports_their_ratio(tmp_path, monkeypatch):
    from bench import ab_versions

    order, rates = [], {"before": [100.0, 120.0], "after": [150.0, 130.0]}
    monkeypatch.setattr(ab_versions, "_checkout", lambda commit, folder: {"A": "aaaaaaa", "B": "bbbbbbb"}[commit])
    monkeypatch.setattr(ab_versions, "_remove", lambda folder: None)

    def run(checkout, precision, tokens):
        order.append(checkout.name)
        return {"tokens_per_s": rates[checkout.name].pop(0)}

    monkeypatch.setattr(ab_versions, "one_run", run)
    monkeypatch.setattr(ab_versions, "write_result", lambda name, record: _write(tmp_path, name, record))
    monkeypatch.setattr("sys.argv", ["x", "--before", "A", "--after", "B"])
    ab_versions.main()
    result = json.loads((tmp_path / "ab_versions_aaaaaaa_bbbbbbb.json").read_text())
    assert order == ["before", "after", "after", "before"]  # ABBA: drift favours neither
    assert result["after_vs_before"] == {"median": 140 / 110, "min": 130 / 120, "max": 150 / 100}
    assert [r["commit"] for r in result["runs"]] == ["aaaaaaa", "bbbbbbb", "bbbbbbb", "aaaaaaa"]
    monkeypatch.setattr("sys.argv", ["x", "--before", "A", "--after", "B", "--rounds", "0"])
    with pytest.raises(SystemExit):
        ab_versions.main()


def test_ab_versions_names_a_commit_git_does_not_know(tmp_path):
    from bench import ab_versions

    with pytest.raises(SystemExit, match="cannot check out 'no-such-commit'.*name a commit of this repository"):
        ab_versions._checkout("no-such-commit", tmp_path / "x")
