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


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_measured_speed_rows_match_ratios_recomputed_from_the_raw_runs(precision):
    path = run_all.RESULTS / f"training_speed_measured_{precision}.json"
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
    assert precisions == ["bfloat16", "float32"]  # one file each: training_speed_measured_<precision>.json
    assert all(command[command.index("--tokens") + 1] == "1048576" for command in commands)
    for command, precision in zip(commands, precisions, strict=True):  # the repeats the table shows
        path = run_all.RESULTS / f"training_speed_measured_{precision}.json"
        if path.exists():
            assert int(command[command.index("--repeats") + 1]) == json.loads(path.read_text())["repeats"]
    assert run_all.invocations("bench_whitening", quick=True)[0][-1] == "--quick"
