"""Repeated seeds: the arithmetic of hetfl.results.seeds, on cases worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from hetfl.results.seeds import aggregate, against_best, band, mean_std_ci, paired_tests, step_interpolate, time_to_target


def test_mean_std_and_confidence_interval_of_three_seeds():
    # 0.8, 0.9, 1.0: mean 0.9; deviations -0.1, 0, 0.1, sum of squares 0.02 / (3 - 1) = 0.01: std 0.1;
    # half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.3027 * 0.057735 = 0.24842
    s = mean_std_ci([0.8, 0.9, 1.0])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.9)
    assert s["std"] == pytest.approx(0.1)
    lo, hi = s["ci95"]
    assert (hi - lo) / 2 == pytest.approx(0.24842, abs=1e-5)
    assert lo == pytest.approx(0.9 - 0.24842, abs=1e-5) and hi == pytest.approx(0.9 + 0.24842, abs=1e-5)


def test_one_seed_has_no_spread_and_missing_values_are_left_out():
    assert mean_std_ci([0.7]) == {"n": 1, "mean": 0.7, "std": None, "ci95": None}
    assert mean_std_ci([]) == {"n": 0, "mean": None, "std": None, "ci95": None}
    s = mean_std_ci([0.5, None, 0.7, float("nan")])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(math.sqrt(0.02))


def test_step_interpolation_holds_the_last_evaluated_value():
    times, values = [0.0, 10.0, 25.0], [0.1, 0.5, 0.9]
    got = step_interpolate(times, values, [0.0, 5.0, 10.0, 24.9, 25.0, 30.0])
    assert got.tolist() == [0.1, 0.1, 0.5, 0.5, 0.9, 0.9]
    assert math.isnan(step_interpolate([2.0], [0.3], [1.0, 2.0])[0])  # nothing measured yet


def test_band_ends_where_the_shortest_seed_ends():
    curves = [([0, 10, 20], [0.1, 0.5, 0.7]), ([0, 5, 15, 30], [0.1, 0.3, 0.6, 0.9])]
    grid, mean, std = band(curves, points=5)  # 0, 5, 10, 15, 20
    assert grid.tolist() == [0.0, 5.0, 10.0, 15.0, 20.0]
    a = np.array([0.1, 0.1, 0.5, 0.5, 0.7])
    b = np.array([0.1, 0.3, 0.3, 0.6, 0.6])
    assert mean == pytest.approx((a + b) / 2)
    assert std == pytest.approx(np.abs(a - b) / math.sqrt(2))  # sample std of two values: |a - b| / sqrt(2)


def test_time_to_target_is_the_mean_over_the_seeds_that_reached_it():
    assert time_to_target([100.0, None, 200.0]) == {"mean_s": 150.0, "reached": 2, "n": 3}
    assert time_to_target([None, None]) == {"mean_s": None, "reached": 0, "n": 2}


def test_paired_tests_agree_with_scipy_on_the_common_seeds():
    a = {0: 0.91, 1: 0.88, 2: 0.93, 3: 0.90, 4: 0.89, 9: 0.5}
    b = {0: 0.86, 1: 0.87, 2: 0.88, 3: 0.84, 4: 0.88, 7: 0.99}  # seeds 9 and 7 are not paired
    x, y = [0.91, 0.88, 0.93, 0.90, 0.89], [0.86, 0.87, 0.88, 0.84, 0.88]
    r = paired_tests(a, b)
    assert r["seeds"] == [0, 1, 2, 3, 4] and r["n"] == 5
    assert r["mean_diff"] == pytest.approx(0.036)
    assert r["ttest_p"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    # by hand: d = 0.05 0.01 0.05 0.06 0.01, mean 0.036, sample std 0.02408, t = 0.036 / (0.02408 / sqrt 5) = 3.343
    assert stats.t.sf(3.3430, 4) * 2 == pytest.approx(r["ttest_p"], rel=1e-3)
    # Wilcoxon, exact: all five differences positive, the smallest possible two-sided p: 2 / 2^5
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(x, y).pvalue) == pytest.approx(0.0625)


def test_paired_tests_need_two_common_seeds_and_some_difference():
    assert paired_tests({0: 0.9}, {0: 0.8, 1: 0.7}) == {"seeds": [0], "n": 1, "mean_diff": pytest.approx(0.1),
                                                         "ttest_p": None, "wilcoxon_p": None}
    same = paired_tests({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same["n"] == 2 and same["ttest_p"] is None and same["wilcoxon_p"] is None


def _summary(seed, final, *, reached=None, status="completed"):
    return {"algorithm": "x", "seed": seed, "status": status, "final_accuracy": final, "best_accuracy": final + 0.05,
            "client_acc_p10": final - 0.2, "bytes_up": 1000, "bytes_down": 3000, "wall_time_s": 2.0 + seed,
            "target_accuracy": 0.85, "time_to_target_s": reached}


def test_an_algorithms_entry_over_its_seeds():
    runs = [_summary(0, 0.8), _summary(1, 0.9, reached=40.0), _summary(2, 1.0, reached=60.0, status="diverged")]
    e = aggregate("fedavg", runs, ["fedavg-seed0", "fedavg-seed1", "fedavg-seed2"])
    assert e["algorithm"] == "fedavg" and e["seeds"] == [0, 1, 2] and e["runs"] == runs
    assert e["status"] == "completed 2, diverged 1"
    assert e["final_accuracy"]["mean"] == pytest.approx(0.9) and e["final_accuracy"]["std"] == pytest.approx(0.1)
    assert e["best_accuracy"]["mean"] == pytest.approx(0.95)
    assert e["client_acc_p10"]["mean"] == pytest.approx(0.7)
    assert e["bytes"] == {"n": 3, "mean": 4000.0, "std": 0.0, "ci95": [4000.0, 4000.0]}
    assert e["wall_time_s"]["mean"] == pytest.approx(3.0)
    assert e["time_to_target_s"] == {"mean_s": 50.0, "reached": 2, "n": 3}
    assert e["target_accuracy"] == 0.85

    other = aggregate("fedprox", [_summary(0, 0.7), _summary(1, 0.75), _summary(2, 0.85)], ["a", "b", "c"])
    entries = [e, other]
    against_best(entries)
    assert e["vs_best"] is None
    assert other["vs_best"]["best"] == "fedavg" and other["vs_best"]["n"] == 3
    assert other["vs_best"]["ttest_p"] == pytest.approx(stats.ttest_rel([0.7, 0.75, 0.85], [0.8, 0.9, 1.0]).pvalue)

    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    keys = [*other, *other["vs_best"], *other["time_to_target_s"]]
    assert not [key for key in keys if f"`{key}`" not in doc], "define them in docs/metrics.md (comparison.json)"


# --------------------------------------------------------------------------- hetfl compare --seeds
SMALL = {"data__n_clients": 3, "rounds": 2, "strategy__clients_per_round": 3, "training__lr": 0.2}


def cli(capsys, *argv) -> tuple[int, str, str]:
    from hetfl.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv) -> str:
    code, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_compare_over_seeds_writes_means_and_spreads(tmp_path, capsys):
    import json

    from conftest import write_config
    from hetfl.results.metrics import read_summary

    out = tmp_path / "cmp"
    config = write_config(tmp_path, **SMALL)
    code, stdout, err = cli(capsys, "compare", config, "--algorithms", "fedavg,fedprox", "--seeds", "0,1,2",
                            "--out", out, "--quiet", "--set", "strategy.per_algorithm.fedprox.mu=1.0")
    assert code == 0, err
    assert err == ""
    assert "seeds 0,1,2" in stdout and " ± " in stdout  # mean ± std in the table
    entries = {e["algorithm"]: e for e in json.loads((out / "comparison.json").read_text())}
    assert set(entries) == {"fedavg", "fedprox"}
    for name, e in entries.items():
        assert e["seeds"] == [0, 1, 2] and e["folders"] == [f"{name}-seed{k}" for k in range(3)]
        summaries = [read_summary(out / f"{name}-seed{k}" / "summary.json") for k in range(3)]
        assert [s["seed"] for s in summaries] == [0, 1, 2]
        finals = [s["final_accuracy"] for s in summaries]
        assert e["final_accuracy"]["mean"] == pytest.approx(np.mean(finals))
        assert e["final_accuracy"]["std"] == pytest.approx(np.std(finals, ddof=1))
        assert [r["final_accuracy"] for r in e["runs"]] == finals
        assert e["time_to_target_s"]["n"] == 3
    assert len({tuple(r["final_accuracy"] for r in e["runs"]) for e in entries.values()}) == 2  # mu changed something
    assert (out / "report.html").is_file() and (out / "accuracy_vs_time.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "6 runs (2 groups of seeds)" in page and "± 1 sample standard deviation" in page  # the band's caption
    assert "paired t-test p = " in page and "best (highest mean)" in page

    # --overwrite with fewer seeds: the seed-2 runs of the earlier comparison go
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedavg", "--seeds", "0,1", "--out", out, "--quiet")
    assert code == 2 and "holds an earlier comparison" in err
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedavg", "--seeds", "0,1", "--out", out, "--quiet",
                       "--overwrite")
    assert code == 0, err
    assert [e["folders"] for e in json.loads((out / "comparison.json").read_text())] == [["fedavg-seed0", "fedavg-seed1"]]
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and any(p.iterdir())) == ["fedavg-seed0", "fedavg-seed1"]


def test_seeds_from_the_config_and_one_seed_keeps_the_old_layout(tmp_path, capsys):
    import json

    from conftest import write_config

    out = tmp_path / "cmp"
    config = write_config(tmp_path, seeds=[4], **SMALL)  # one seed: one folder per algorithm, a list of summaries
    code, stdout, err = cli(capsys, "compare", config, "--algorithms", "fedavg", "--out", out, "--quiet")
    assert code == 0, err
    assert "seed 4" in stdout
    summaries = json.loads((out / "comparison.json").read_text())
    assert [(s["algorithm"], s["seed"]) for s in summaries] == [("fedavg", 4)] and (out / "fedavg" / "summary.json").is_file()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--seeds", "0,x"], "--seeds: 'x' is not an integer"),
    (["--seeds", "0,1,0"], "--seeds: 0 is given twice"),
    (["--seeds", ","], "--seeds: none given"),
    (["--seeds", "-1"], "--seeds: -1 is negative"),
    (["--set", "seeds=[0, 1.5]"], "seeds: 1.5 is not an integer"),
    (["--set", "seeds=[]"], "seeds: an empty list"),
    (["--set", "seeds=[2, 2]"], "seeds: 2 is given twice"),
    (["--set", "seeds=3"], "seeds: expected a list of integer seeds"),
])
def test_a_bad_seed_is_one_line_naming_the_key(tmp_path, capsys, argv, needle):
    from conftest import write_config

    line = one_line_error(capsys, "compare", write_config(tmp_path, **SMALL), "--algorithms", "fedavg",
                          "--out", tmp_path / "cmp", "--quiet", *argv)
    assert needle in line
    assert not (tmp_path / "cmp").exists()


# --------------------------------------------------------------------------- hetfl report on a folder of seed runs
def seed_run(folder, algorithm: str, seed: int, top: float, step_s: float, rounds: int = 6):
    """A run folder as hetfl run writes it, its accuracy rising to ``top`` in ``rounds`` evaluations ``step_s`` apart."""
    import yaml

    from hetfl.results import MetricsLog, write_summary

    folder.mkdir(parents=True)
    config = {"name": "seeds", "seed": seed, "rounds": rounds, "data": {"dataset": "digits", "n_clients": 4},
              "strategy": {"name": algorithm}, "evaluation": {"target_accuracy": 0.5}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"round": r, "sim_time_s": r * step_s, "wall_time_s": 0.1 * r, "accuracy": top * r / rounds,
                "bytes_up": 10 * r, "bytes_down": 30 * r} for r in range(rounds + 1)]
    with MetricsLog(folder / "metrics.jsonl") as log:
        for record in records:
            log.append(record)
    reached = next((x["sim_time_s"] for x in records if x["accuracy"] >= 0.5), None)
    write_summary(folder / "summary.json", {
        "name": "seeds", "algorithm": algorithm, "status": "completed", "seed": seed, "final_accuracy": top,
        "best_accuracy": top, "client_acc_p10": top - 0.1, "rounds": rounds, "sim_time_s": rounds * step_s,
        "wall_time_s": 0.1 * rounds, "bytes_up": 10 * rounds, "bytes_down": 30 * rounds, "target_accuracy": 0.5,
        "time_to_target_s": reached})


def test_report_groups_runs_that_differ_only_in_seed(tmp_path, capsys):
    import re

    from hetfl.results import render_report

    finals = {"fedavg": [0.80, 0.90, 0.85, 0.88], "fedbuff": [0.60, 0.70, 0.62, 0.75]}
    for algorithm, tops in finals.items():
        for seed, top in enumerate(tops):
            seed_run(tmp_path / f"{algorithm}-{seed}", algorithm, seed, top, 10.0 + seed)
    seed_run(tmp_path / "lone", "fedavg", 0, 0.7, 10.0, rounds=3)  # another config (3 rounds): its own line
    page = render_report(tmp_path).read_text()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "9 runs (2 groups of seeds)" in text
    assert "fedavg 0, 1, 2, 3 completed 85.8% ± 4.3 pt" in text  # mean 0.8575, std 0.0427
    ttest = stats.ttest_rel(finals["fedbuff"], finals["fedavg"]).pvalue
    wilcoxon = stats.wilcoxon(finals["fedbuff"], finals["fedavg"]).pvalue
    assert f"paired t-test p = {ttest:.3g} (significant)" in text
    assert f"Wilcoxon p = {wilcoxon:.3g} (not significant)" in text  # n = 4: its smallest p is 0.125
    assert "n/a (fewer than 2 seeds in common" in text  # the lone run, one seed
    assert "band ± 1 sample standard deviation" not in text and "± 1 sample standard deviation" in text
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0
    assert "fedavg seed 3" in text  # each run still listed, in the table of runs
