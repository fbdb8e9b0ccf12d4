"""Fair tuning (hetfl.sweep, hetfl sweep, hetfl compare --tuned): the grid, the choice, the validation split, and
that a trial never reads the test split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hetfl.errors import HetflError
from hetfl.sweep import choose, config_hash, parse_grid, settings, spread
from test_seeds import SMALL, cli  # a 3-client federation of 2 rounds; main() with its exit code, stdout, stderr


# ---------------------------------------------------------------------------- the grid
def test_grid_values_parse_like_overrides_and_the_product_varies_the_last_key_fastest():
    grid = parse_grid(["strategy.params.buffer_size=5,10,20", "training.lr=0.01,0.05", "training.optimizer=sgd"])
    assert grid == {"strategy.params.buffer_size": [5, 10, 20], "training.lr": [0.01, 0.05], "training.optimizer": ["sgd"]}
    assert isinstance(grid["strategy.params.buffer_size"][0], int) and isinstance(grid["training.lr"][0], float)
    assert [(s["strategy.params.buffer_size"], s["training.lr"]) for s in settings(grid)] == [
        (5, 0.01), (5, 0.05), (10, 0.01), (10, 0.05), (20, 0.01), (20, 0.05)]
    assert all(s["training.optimizer"] == "sgd" for s in settings(grid))


@pytest.mark.parametrize("item, says", [
    ("training.lr", "expected KEY=v1,v2"),
    ("=0.1,0.2", "expected KEY=v1,v2"),
    ("training.lr=", "an empty value"),
    ("training.lr=0.1,,0.2", "an empty value"),
    ("training.lr=0.1,0.1", "a value given twice"),
    ("seed=1,2", "set by the sweep itself"),
    ("evaluation.split=test", "set by the sweep itself"),
])
def test_grid_mistakes_are_one_line_naming_the_option(item, says):
    with pytest.raises(HetflError, match=says):
        parse_grid([item])


def test_a_key_given_twice_and_no_grid_are_refused():
    with pytest.raises(HetflError, match="given twice"):
        parse_grid(["training.lr=0.1", "training.lr=0.2"])
    with pytest.raises(HetflError, match="no --grid"):
        parse_grid([])


# ---------------------------------------------------------------------------- the choice
def _trials(*per_seed):
    return [{"index": i, "score": spread(scores)} for i, scores in enumerate(per_seed)]


def test_the_best_setting_from_known_scores_and_the_tie_rule():
    # means: 0.85 (std 0.0707), 0.85 (std 0), 0.95 but a seed without a score, 0.85 (std 0.0707), 0.80
    trials = _trials([0.8, 0.9], [0.85, 0.85], [0.95, None], [0.9, 0.8], [0.8, 0.8])
    assert trials[0]["score"]["mean"] == pytest.approx(0.85)
    assert trials[0]["score"]["std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # sqrt(sum (x - 0.85)^2 / (2 - 1))
    assert trials[2]["score"]["complete"] is False
    assert choose(trials, "final_accuracy") == 1  # equal means: the smaller spread
    assert choose(_trials([0.8, 0.9], [0.9, 0.8]), "final_accuracy") == 0  # equal means and spreads: the grid's order
    assert choose(_trials([0.5, 0.6], [0.7, 0.9]), "best_accuracy") == 1
    # time to target: the lowest mean; a setting that missed the target on a seed ranks last
    assert choose(_trials([30.0, 50.0], [20.0, None], [45.0, 45.0]), "time_to_target") == 0
    assert choose(_trials([None, None], [None, 1.0]), "time_to_target") == 0  # none complete: the grid's order


def test_the_config_hash_ignores_the_grid_keys_seeds_and_the_validation_split(digits_config):
    base = config_hash(digits_config, "fedbuff", ["training.lr"])
    other_lr = digits_config.model_copy(deep=True)
    other_lr.training.lr = 0.5
    other_lr.seed = 3
    other_lr.data.validation_fraction = 0.3
    assert config_hash(other_lr, "fedbuff", ["training.lr"]) == base
    other_batch = digits_config.model_copy(deep=True)
    other_batch.training.batch_size = 8
    assert config_hash(other_batch, "fedbuff", ["training.lr"]) != base
    assert config_hash(digits_config, "fedasync", ["training.lr"]) != base  # another algorithm


# ---------------------------------------------------------------------------- the validation split
def test_validation_split_sizes_per_client_and_the_test_split_unchanged():
    from hetfl.config import DataConfig
    from hetfl.data.partition import federate, split_train_test

    # hand-worked: round(0.25 n), at least 1 and at most n - 1 for n >= 2 (numpy rounds 2.5 to 2)
    parts = [np.arange(0, 1), np.arange(1, 3), np.arange(3, 7), np.arange(7, 17)]
    train, val = split_train_test(parts, np.zeros(17, dtype=np.int64), 0.25, np.random.default_rng(0))
    assert [len(v) for v in val] == [0, 1, 1, 2] and [len(t) for t in train] == [1, 1, 3, 8]

    plain = federate(DataConfig(n_clients=5), seed=1)
    held = federate(DataConfig(n_clients=5, validation_fraction=0.25), seed=1)
    assert plain.validation == []
    for c in range(5):
        n = len(plain.train[c])
        assert len(held.validation[c]) == min(max(round(0.25 * n), 1), n - 1)
        np.testing.assert_array_equal(held.test[c], plain.test[c])  # the test split is the same with or without
        assert not set(held.validation[c]) & set(held.train[c])
        np.testing.assert_array_equal(np.sort(np.concatenate([held.train[c], held.validation[c]])), plain.train[c])


def test_evaluation_on_validation_needs_a_validation_split():
    from hetfl.config import validate
    from hetfl.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluation.split: validation needs a validation split"):
        validate({"evaluation": {"split": "validation"}})
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        validate({"data": {"dataset": "synthetic", "validation_fraction": 0.2}})


@pytest.fixture
def poisoned_test_split(monkeypatch):
    """Every client's test samples NaN: a run that scores them sees NaN losses."""
    import hetfl.engine.run as run_module

    real = run_module.federate

    def federate(cfg, seed):
        fed = real(cfg, seed)
        fed.dataset.x[np.concatenate(fed.test)] = np.nan
        return fed

    monkeypatch.setattr(run_module, "federate", federate)


def test_a_trial_never_reads_the_test_split(tmp_path, capsys, poisoned_test_split):
    from conftest import write_config
    from hetfl.results.metrics import read_metrics

    config = write_config(tmp_path, **SMALL)
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "test", "--quiet")  # the poison shows on test
    assert code == 0, err
    assert all(math.isnan(r["loss"]) for r in read_metrics(tmp_path / "test" / "metrics.jsonl") if "loss" in r)

    code, _, err = cli(capsys, "sweep", config, "--algorithm", "fedavg", "--grid", "training.lr=0.05,0.2",
                       "--seeds", "0,1", "--out", tmp_path / "sw", "--quiet")
    assert code == 0, err
    sweep = json.loads((tmp_path / "sw" / "fedavg" / "sweep.json").read_text())
    for trial in sweep["trials"]:
        assert all(v is not None and 0 <= v <= 1 for v in trial["scores"].values())
        for folder in trial["folders"]:
            records = [r for r in read_metrics(tmp_path / "sw" / "fedavg" / folder / "metrics.jsonl") if "loss" in r]
            assert records and all(math.isfinite(r["loss"]) and math.isfinite(r["client_acc_p10"]) for r in records)


# ---------------------------------------------------------------------------- the commands
def test_sweep_then_tuned_comparison(tmp_path, capsys):
    import yaml

    from conftest import write_config

    config = write_config(tmp_path, **SMALL)
    sw = tmp_path / "sw"
    code, out, err = cli(capsys, "sweep", config, "--algorithm", "fedavg", "--grid", "training.lr=0.01,0.3",
                         "--grid", "training.local_steps=1,5", "--seeds", "0,1", "--out", sw, "--quiet")
    assert code == 0, err
    assert "chosen: training.lr=" in out and "*" in out
    sweep = json.loads((sw / "fedavg" / "sweep.json").read_text())
    assert sweep["budget"] == {"settings": 4, "runs": 8} and sweep["split"] == "validation"
    assert [t["setting"] for t in sweep["trials"]][1] == {"training.lr": 0.01, "training.local_steps": 5}
    assert sweep["best"]["index"] == choose(sweep["trials"], "final_accuracy")
    best = sweep["best"]["setting"]
    for t in sweep["trials"]:
        assert t["score"]["mean"] == pytest.approx(np.mean(list(t["scores"].values())))
        run_cfg = yaml.safe_load((sw / "fedavg" / t["folders"][1] / "config.yaml").read_text())
        assert run_cfg["seed"] == 1 and run_cfg["evaluation"]["split"] == "validation"
        assert run_cfg["data"]["validation_fraction"] == 0.2 and run_cfg["training"]["lr"] == t["setting"]["training.lr"]
    assert (sw / "fedavg" / "sweep.png").stat().st_size > 0

    code, _, err = cli(capsys, "sweep", config, "--algorithm", "fedavg", "--grid", "training.lr=0.1", "--out", sw)
    assert code == 2 and "add --overwrite" in err
    code, _, err = cli(capsys, "sweep", config, "--algorithm", "fedprox", "--grid", "strategy.params.mu=0.01,1.0",
                       "--seeds", "0,1", "--out", sw, "--quiet")
    assert code == 0, err

    cmp = tmp_path / "cmp"
    code, out, err = cli(capsys, "compare", config, "--tuned", sw, "--seeds", "5,6", "--out", cmp, "--quiet")
    assert code == 0, err
    assert "tuning budgets differ (fedavg 8 runs, fedprox 4 runs)" in err and len(err.strip().splitlines()) == 1
    assert "tuned fedavg: " in out
    entries = {e["algorithm"]: e for e in json.loads((cmp / "comparison.json").read_text())}
    assert entries["fedavg"]["tuned"]["setting"] == best and entries["fedavg"]["tuned"]["budget"]["runs"] == 8
    for seed in (5, 6):  # the chosen setting applied, scored on the test split, trained on every training sample
        run_cfg = yaml.safe_load((cmp / f"fedavg-seed{seed}" / "config.yaml").read_text())
        assert run_cfg["training"]["lr"] == best["training.lr"]
        assert run_cfg["training"]["local_steps"] == best["training.local_steps"]
        assert run_cfg["evaluation"]["split"] == "test" and run_cfg["data"]["validation_fraction"] == 0
    mu = json.loads((sw / "fedprox" / "sweep.json").read_text())["best"]["setting"]["strategy.params.mu"]
    assert yaml.safe_load((cmp / "fedprox-seed5" / "config.yaml").read_text())["strategy"]["params"] == {"mu": mu}

    # another config (not in a swept key) is refused; a swept key may differ
    code, _, err = cli(capsys, "compare", config, "--tuned", sw, "--algorithms", "fedavg", "--seeds", "5",
                       "--out", tmp_path / "cmp2", "--set", "training.batch_size=8")
    assert code == 2 and "was swept on another config" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, says", [
    (["--grid", "training.lr"], "expected KEY=v1,v2"),
    (["--grid", "training.lr="], "an empty value"),
    (["--grid", "training.lrate=0.1"], "training.lrate: unknown key"),
    (["--grid", "strategy.params.nope=1"], "nope"),
    (["--grid", "training.lr=0.1", "--algorithm", "fedavg,fedprox"], "one algorithm a sweep"),
    (["--grid", "training.lr=0.1", "--objective", "loss"], "--objective 'loss'"),
])
def test_sweep_mistakes_are_one_line(tmp_path, capsys, argv, says):
    from conftest import write_config

    config = write_config(tmp_path, **SMALL)
    args = ["sweep", config, "--out", tmp_path / "sw", *argv]
    if "--algorithm" not in argv:
        args += ["--algorithm", "fedavg"]
    code, _, err = cli(capsys, *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sw").exists()  # nothing ran


def test_tuned_comparison_of_a_missing_sweep_folder_is_one_line(tmp_path, capsys):
    from conftest import write_config

    config = write_config(tmp_path, **SMALL)
    code, _, err = cli(capsys, "compare", config, "--tuned", tmp_path / "nowhere", "--out", tmp_path / "cmp")
    assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "compare", config, "--tuned", tmp_path / "empty", "--out", tmp_path / "cmp")
    assert code == 2 and "no algorithm swept there" in err
    code, _, err = cli(capsys, "compare", config, "--out", tmp_path / "cmp")
    assert code == 2 and "--tuned SWEEPDIR" in err


def test_a_sweep_folder_holding_other_files_is_refused(tmp_path, capsys):
    from conftest import write_config

    config = write_config(tmp_path, **SMALL)
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "sweep", config, "--algorithm", "fedavg", "--grid", "training.lr=0.1", "--out",
                       tmp_path / "sw")
    assert code == 2 and "notes.txt" in err and (tmp_path / "sw" / "notes.txt").read_text() == "mine"


def _tiny_runs(tmp_path, n: int):
    from conftest import write_config
    from hetfl.config import load_config

    tmp_path.mkdir()
    config = write_config(tmp_path, **SMALL)
    return [(load_config(config, [f"seed={k}", f"training.lr={0.05 * (k + 1)}"]), str(tmp_path / f"r{k}"))
            for k in range(n)]


def test_worker_processes_give_the_same_results_as_one_process(tmp_path):
    from hetfl.sweep import run_all

    one = run_all(_tiny_runs(tmp_path / "one", 2), jobs=1)
    two = run_all(_tiny_runs(tmp_path / "two", 2), jobs=2)
    keys = ("final_accuracy", "best_accuracy", "client_acc_p10", "bytes_up", "sim_time_s", "seed")
    assert [{k: s[k] for k in keys} for s in one] == [{k: s[k] for k in keys} for s in two]
    assert len({s["final_accuracy"] for s in one}) > 1  # the runs differ, so the order is checked too


@pytest.mark.serial
def test_ray_tasks_give_the_same_results_as_one_process(tmp_path):
    pytest.importorskip("ray")
    from hetfl.sweep import run_all

    one = run_all(_tiny_runs(tmp_path / "one", 2), jobs=1)
    on_ray = run_all(_tiny_runs(tmp_path / "ray", 2), jobs=2, ray="local")
    assert [s["final_accuracy"] for s in one] == [s["final_accuracy"] for s in on_ray]


@pytest.mark.parametrize("grid", [{"training.lr": [0.01, 0.1, 0.5]},
                                  {"training.lr": [0.01, 0.1], "a.b": [1, 2], "c.d": ["x", "y"]}])
def test_the_figure_for_one_key_and_for_more_than_two(tmp_path, grid):
    from hetfl.results.heatmap import _plane, draw_sweep
    from hetfl.sweep import record

    trials = [(s, [{"status": "completed", "final_accuracy": 0.1 * (i + 1) + 0.01 * k} for k in range(2)])
              for i, s in enumerate(settings(grid))]
    trials[0][1][0]["status"] = "diverged"  # a blank point
    sweep = record("fedavg", "c.yaml", "0" * 16, "final_accuracy", grid, [0, 1], 0.2, trials)
    assert sweep["best"]["index"] == len(trials) - 1 and sweep["trials"][0]["score"]["complete"] is False
    keys, plane, note = _plane(sweep)
    if len(grid) == 1:
        assert keys == ["training.lr"] and len(plane) == 3 and note == ""
    else:  # the plane through the chosen setting: c.d fixed at its chosen value
        assert keys == ["training.lr", "a.b"] and len(plane) == 4 and all(t["setting"]["c.d"] == "y" for t in plane)
        assert note == " at c.d=y (the chosen values)"
    assert draw_sweep(sweep, tmp_path / "sweep.png").stat().st_size > 0
