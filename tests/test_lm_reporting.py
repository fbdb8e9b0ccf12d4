"""Where users see a language-model run: perplexity in ``hetfl run``'s last line, in ``hetfl compare``'s
table and in ``hetfl report``; what a transfer carries in the description line (adapters for fedlora)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from hetfl.cli import _announce, comparison_table, main
from hetfl.config import validate
from hetfl.engine.run import Scoreboard, build_federation
from hetfl.results import MetricsLog, render_report, write_summary


def lm_raw(**strategy) -> dict:
    """4 text clients, an untrained d_model-16 TinyLM (2 heads, d_ff 32, 2 layers, context 16), 2 rounds of 2."""
    return {
        "name": "lm", "seed": 0, "rounds": 2,
        "data": {"dataset": "text", "n_clients": 4, "text": {"context": 16, "tokens_per_client": 1024}},
        "devices": {"compute": {"distribution": "tiers", "median_flops": 2e8}},
        "model": {"name": "tinylm", "d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 2},
        "training": {"optimizer": "adam", "lr": 0.01, "batch_size": 8, "local_steps": 2},
        "strategy": {"name": "fedlora", "clients_per_round": 2, **strategy},
    }


def summary(algorithm: str, perplexity: float | None, accuracy: float) -> dict:
    return {"algorithm": algorithm, "status": "completed", "final_accuracy": accuracy, "best_accuracy": accuracy + 0.01,
            "final_perplexity": perplexity, "rounds": 20, "sim_time_s": 100.0, "wall_time_s": 5.0,
            "target_accuracy": 0.9, "time_to_target_s": None, "rounds_to_target": None, "bytes_up": 1e6,
            "bytes_down": 2e6, "staleness_mean": 0.0, "idle_fast_frac": 0.1, "participation_jain": 0.9}


# --------------------------------------------------------------------------- hetfl run: the last line
def test_the_run_line_shows_perplexity_for_a_language_model_and_accuracy_otherwise(capsys):
    _announce(summary("fedlora", 9.4412, 0.3012), Path("out"))
    line = capsys.readouterr().out
    assert "perplexity 9.44, next-token accuracy 0.3012 (best 0.3112)" in line
    assert "perplexity target — reached at" in line  # no target in the summary
    _announce({**summary("fedlora", 9.4412, 0.3012), "target_perplexity": 9.975, "time_to_target_s": 30.0}, Path("o"))
    assert "perplexity target 9.97 reached at 30.0 s" in capsys.readouterr().out
    _announce(summary("fedavg", None, 0.9), Path("out"))
    line = capsys.readouterr().out
    assert "accuracy 0.9000 (best 0.9100)" in line and "perplexity" not in line


# --------------------------------------------------------------------------- hetfl compare: the table
def _render(summaries) -> str:
    console = Console(width=160, record=True)
    console.print(comparison_table(summaries, "t"))
    return console.export_text()


def test_compare_adds_a_perplexity_column_only_for_language_model_runs():
    text = _render([summary("fedlora", 9.4412, 0.3012), summary("fedavg", 8.7612, 0.3311)])
    assert "ppl" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith("fed")}
    assert rows["fedlora"][2:4] == ["9.44", "0.3012"] and rows["fedavg"][2:4] == ["8.76", "0.3311"]
    assert "ppl" not in _render([summary("fedavg", None, 0.9)])


# --------------------------------------------------------------------------- hetfl report
def _lm_run(folder: Path, algorithm: str, perplexities: list[float] | None) -> Path:
    """A run folder with one metrics line per perplexity (None: a classification run of 3 evaluations)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": algorithm, "strategy": {"name": algorithm}}))
    values = perplexities or [None, None, None]
    with MetricsLog(folder / "metrics.jsonl") as log:
        for r, ppl in enumerate(values):
            record = {"round": r, "sim_time_s": 10.0 * r, "wall_time_s": 0.1 * r, "accuracy": 0.2 + 0.01 * r,
                      "loss": 2.0, "bytes_up": 1000 * r, "bytes_down": 1000 * r}
            log.append(record if ppl is None else {**record, "perplexity": ppl})
    final = summary(algorithm, perplexities[-1] if perplexities else None, 0.22)
    write_summary(folder / "summary.json", final)
    return folder


def test_report_plots_perplexity_over_time_and_tabulates_it_for_language_model_runs(tmp_path):
    root = tmp_path / "lm"
    _lm_run(root / "a", "fedlora", [10.5, 9.9, 9.47])
    _lm_run(root / "b", "fedavg", [10.5, 9.1, 8.76])
    html = render_report(root).read_text()
    assert (root / "perplexity_vs_time.png").stat().st_size > 0
    assert "perplexity_vs_time.png" in html and "<th>final perplexity</th>" in html
    assert '<td class="num best">8.76</td>' in html and '<td class="num">9.47</td>' in html  # lower is better
    plain = tmp_path / "plain"
    _lm_run(plain / "c", "fedavg", None)
    html = render_report(plain).read_text()
    assert not (plain / "perplexity_vs_time.png").exists()
    assert "perplexity_vs_time" not in html and "final perplexity" not in html


# --------------------------------------------------------------------------- the description line
def test_the_description_says_what_a_transfer_carries_for_the_strategy():
    # q and v in 2 blocks, each 16 x 16: a rank-r adapter is r * 4 * (16 + 16) = 128 r numbers = 0.512 r kB
    fed = build_federation(validate(lm_raw(params={"ranks": {"low": 1, "mid": 2, "high": 4}})))
    line = fed.describe(fed.strategy())
    assert "adapters of rank 1-4, 0.5-2.0 kB a transfer" in line and "\n" not in line
    assert f"{fed.trainer.numel * 4 / 1e3:.1f} kB" not in line  # not the whole model
    flora = build_federation(validate(lm_raw(params={"aggregation": "flora", "rank": 2})))
    assert "rank-2 adapters, 1.0 kB up, the missed rounds' stacks (or dense weights) of 4 layers down" in flora.describe(
        flora.strategy())
    fedavg = build_federation(validate(lm_raw(name="fedavg")))
    assert f"{fedavg.trainer.numel:,} parameters, {fedavg.trainer.numel * 4 / 1e3:.1f} kB a transfer" in fedavg.describe()


def test_hetfl_run_prints_the_adapter_transfer_and_the_final_perplexity(tmp_path, capsys):
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(lm_raw(params={"rank": 2})))
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "rank-2 adapters, 1.0 kB a transfer" in out
    assert f"perplexity {saved['final_perplexity']:.2f}, next-token accuracy" in out
    # the default target: 0.95 x the perplexity of the first evaluation (the starting model)
    assert first["round"] == 0 and saved["target_perplexity"] == pytest.approx(0.95 * first["perplexity"])
    assert f"perplexity target {saved['target_perplexity']:.2f} reached at" in out


# --------------------------------------------------------------------------- the target of a language model
def record(r: int, perplexity: float, accuracy: float = 0.3) -> dict:
    return {"round": r, "sim_time_s": 10.0 * r, "accuracy": accuracy, "perplexity": perplexity}


def test_a_language_models_target_is_095_of_its_first_perplexity_unless_set():
    board = Scoreboard(0.9)
    for r, ppl in enumerate([10.0, 9.6, 9.4, 9.8]):  # target 9.5: first reached at round 2 (20 s)
        board.observe(record(r, ppl))
    assert board.target_perplexity == pytest.approx(9.5)
    assert (board.time_to_target_s, board.rounds_to_target) == (20.0, 2)
    board = Scoreboard(0.9, target_perplexity=9.6)  # set: reached at 9.6 exactly (round 1)
    for r, ppl in enumerate([10.0, 9.6, 9.4]):
        board.observe(record(r, ppl, accuracy=0.95))  # next-token accuracy above 0.9 is not the target
    assert (board.target_perplexity, board.time_to_target_s) == (9.6, 10.0)
    board = Scoreboard(0.5)  # a classifier: the accuracy target
    for r, accuracy in enumerate([0.1, 0.4, 0.5]):
        board.observe({"round": r, "sim_time_s": 10.0 * r, "accuracy": accuracy})
    assert (board.target_perplexity, board.time_to_target_s) == (None, 20.0)


def test_stop_at_target_stops_a_language_model_at_its_perplexity_target(tmp_path):
    raw = lm_raw(params={"rank": 2})
    raw["rounds"] = 30
    raw["evaluation"] = {"target_perplexity": 1e6, "stop_at_target": True}  # reached by the first evaluation
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["time_to_target_s"] == 0.0 and saved["rounds"] < 30


def test_the_report_marks_a_language_models_perplexity_target(tmp_path):
    from hetfl.results.report import _load_run

    root = tmp_path / "lm"
    _lm_run(root / "a", "fedlora", [10.0, 9.6, 9.4])  # no target in the summary: 0.95 x 10 = 9.5, at 20 s
    run = _load_run(root / "a")
    assert run.target is None and run.perplexity_target == pytest.approx(9.5)
    assert run.first_at_target()["sim_time_s"] == 20.0
    html = render_report(root).read_text()
    assert "target perplexity 9.5" in html
