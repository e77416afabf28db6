"""The scaling figure and table (several student sizes) and the teacher-conditioned table."""

import json
import statistics

import pytest

from lightning_caopd.report.__main__ import main
from lightning_caopd.report.table import (
    collect,
    groups,
    report_markdown,
    scaling_points,
    summary_table,
    write_report,
)
from tests.report.sweep import evaluation, write_run, write_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _row(table: str, first_cell: str) -> list[str]:
    """The cells of the markdown row whose first cell is `first_cell`."""
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _scaling_section(markdown: str) -> str:
    return markdown.split("## Scaling with student size")[1].split("## ")[0]


def test_scaling_table_holds_the_means_of_the_runs_and_base_from_initial(tmp_path):
    runs = write_sweep(tmp_path / "opd_caopd", seeds=(0, 1))
    # a third OPD seed: the base of that seed counts once, not once per method
    for size, n_params, base_acc in ((16, 20_000, 0.45), (32, 60_000, 0.52)):
        runs.append(
            write_run(
                tmp_path / f"extra{size}",
                "opd",
                7,
                evaluation(0.9, 0.95),
                evaluation(base_acc + 0.1, 0.5),
                (f"size={size}",),
                n_params,
            )
        )
    written = write_report([tmp_path], tmp_path / "out")
    assert written["scaling"].read_bytes()[:8] == PNG
    assert written["scaling"].stat().st_size > 40_000
    section = _scaling_section(written["table"].read_text())
    header = _row(section, "params")
    assert header[1] == "base" and sorted(header[2:]) == ["caopd", "opd"]  # methods in run order

    def cell(method: str, n: int) -> str:
        """accuracy / confidence / ECE, averaged here from the files written."""
        if method == "base":  # each distinct initial evaluation once (one per seed)
            evals = {json.dumps(r["initial"]): r["initial"] for r in runs if r["n_parameters"] == n}
            evals = list(evals.values())
        else:
            evals = [r for r in runs if r["run"]["method"] == method and r["n_parameters"] == n]
        keys = ("accuracy", "mean_confidence", "ece")
        return " / ".join(f"{statistics.fmean(e[k] for e in evals):.3f}" for k in keys)

    for n, name in ((20_000, "20K"), (60_000, "60K"), (200_000, "200K"), (700_000, "700K")):
        assert _row(section, name)[1:] == [cell(h, n) for h in header[1:]]
    # the extra seed moves the 20K means: OPD over three runs, base over three seeds
    row = dict(zip(header, _row(section, "20K"), strict=True))
    assert row["opd"].startswith(f"{statistics.fmean([0.49, 0.5, 0.9]):.3f} / ")
    # 0.480: weighting each seed's base once per method that shares it would give 0.466
    assert row["base"].startswith(f"{statistics.fmean([0.44, 0.45, 0.55]):.3f} / ")

    points = scaling_points(collect([tmp_path]))
    mean, std, count = points["opd"][20_000]["accuracy"]
    assert count == 3 and std == pytest.approx(statistics.stdev([0.49, 0.5, 0.9]))
    assert points["caopd"][700_000]["ece"][1] is not None  # two seeds: an error bar
    assert list(points["opd"]) == [20_000, 60_000, 200_000, 700_000]


def test_sizes_split_summary_rows_and_the_base(tmp_path):
    write_sweep(tmp_path, seeds=(0, 1))
    table = summary_table(collect([tmp_path]))
    for size in (16, 32, 64, 128):
        assert _row(table, f"opd (size={size})")[1] == "2"
        assert _row(table, f"caopd (size={size})")[1] == "2"
    assert _row(table, "base (20K params)")[1:3] == ["2", "0.445 ± 0.007"]
    assert _row(table, "base (700K params)")[1] == "2"
    assert "| base |" not in table


def test_a_size_swept_through_an_ignored_override_still_splits_rows(tmp_path):
    # model.path is not a config override (it names where weights live), yet here it is the size
    for seed in (0, 1):
        for path, n_params, acc in (("/w/small", 20_000, 0.4), ("/w/large", 1_200_000, 0.8)):
            write_run(
                tmp_path / f"{n_params}_{seed}",
                "caopd",
                seed,
                evaluation(acc + seed / 100, acc),
                evaluation(acc - 0.1, 0.9),
                (f"model.path={path}",),
                n_params,
            )
    runs = collect([tmp_path])
    by_group = groups(runs)
    assert {k: len(v) for k, v in by_group.items()} == {
        "base (20K params)": 1,
        "base (1.2M params)": 1,
        "caopd (20K params)": 2,
        "caopd (1.2M params)": 2,
    }
    assert _row(summary_table(runs), "caopd (1.2M params)")[2] == "0.805 ± 0.007"
    # no override separates the sizes, and the series still has a point per size
    assert list(scaling_points(runs)["caopd"]) == [20_000, 1_200_000]


def test_one_size_or_no_n_parameters_draws_no_scaling_figure(tmp_path, capsys):
    one_size = tmp_path / "one"
    no_size = tmp_path / "none"
    for seed in (0, 1):
        for method in ("opd", "caopd"):
            final, initial = evaluation(0.6, 0.9), evaluation(0.5, 0.8)
            write_run(one_size / f"{method}{seed}", method, seed, final, initial, (), 20_000)
            write_run(no_size / f"{method}{seed}", method, seed, final, initial)
    # and a sized run among unsized ones: still one size
    write_run(no_size / "sized", "opd", 5, evaluation(0.6, 0.9), evaluation(0.5, 0.8), (), 9_000)
    for folder in (one_size, no_size):
        written = write_report([folder], folder / "out")
        assert "scaling" not in written and not (folder / "out" / "scaling.png").exists()
        markdown = written["table"].read_text()
        assert "Scaling" not in markdown and "| base | 1 |" in markdown
        assert scaling_points(collect([folder])) == {}
    main([str(no_size), "--no-figures"])
    assert "| opd | 3 |" in capsys.readouterr().out


def test_teacher_conditioned_table_present_or_absent(tmp_path):
    blocks = [
        {
            "accuracy": 0.8,
            "mean_confidence": 0.85,
            "confidence_entropy": 0.3,
            "optimism_gap": 0.05,
            "entropy_gap": -0.2,
        },
        {
            "accuracy": 0.9,
            "mean_confidence": 0.9,
            "confidence_entropy": 0.5,
            "optimism_gap": 0.0,
            "entropy_gap": -0.1,
        },
    ]
    for seed, block in enumerate(blocks):
        final = evaluation(0.6 + seed / 10, 0.7)
        write_run(
            tmp_path / f"opd{seed}", "opd", seed, final, evaluation(0.5, 0.8), (), None, block
        )
        write_run(tmp_path / f"caopd{seed}", "caopd", seed, final, evaluation(0.5, 0.8))
    runs = collect([tmp_path])
    markdown = report_markdown(runs, [tmp_path])
    section = markdown.split("## Teacher-conditioned evaluation")[1]
    header = _row(section, "model")
    assert header[2:] == [
        "accuracy",
        "mean_confidence",
        "confidence_entropy",
        "optimism_gap",
        "entropy_gap",
        "student accuracy",
        "student confidence_entropy",
    ]
    opd = dict(zip(header, _row(section, "opd"), strict=True))
    assert opd["runs"] == "2"
    assert opd["accuracy"] == "0.850 ± 0.071"  # the teacher-conditioned block's, not the student's
    assert opd["entropy_gap"] == "-0.150 ± 0.071"
    assert opd["student accuracy"] == "0.650 ± 0.071"
    assert "| caopd |" not in section and "| base |" not in section  # no block: no row
    for folder in tmp_path.glob("opd*"):
        folder.joinpath("metrics.json").unlink()
    assert "Teacher-conditioned" not in report_markdown(collect([tmp_path]), [tmp_path])
