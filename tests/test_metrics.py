"""Staleness and fairness metrics, worked by hand on tiny federations (docs/metrics.md has the definitions).

Clients take a known time per task: 2 local steps of 1e6 FLOPs each, on a device of 2e6 FLOP/s
(1 s) or 2e6/3 FLOP/s (3 s), with a network so fast it adds nothing measurable.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console

from conftest import TINY, make_simulator, profile, run_rounds
from hetfl.cli import comparison_table
from hetfl.config import validate
from hetfl.devices import DeviceProfile, DeviceTable
from hetfl.engine.run import PROGRESS_TOTAL, Run, build_federation, progress, run_experiment
from hetfl.results import read_metrics, read_summary, render_report, write_summary
from hetfl.results.fairness import fastest, jain_index, staleness_stats
from hetfl.strategies import FedAvg
from hetfl.strategies.base import Strategy

FAST, SLOW = 2e6, 2e6 / 3  # FLOP/s: 1 s and 3 s a task


def device(client_id: int, flops: float, **kw):
    return profile(client_id, flops=flops, speed=flops / 1e6, bw=1e12, **kw)


class MixOnArrival(Strategy):
    """Mix each update on arrival and send its client straight back (as in tests/test_interface.py)."""

    name = "mix-on-arrival"

    def start(self, server) -> None:
        for client in server.available():
            server.dispatch(client)

    def on_update(self, server, update) -> None:
        server.commit(0.5 * server.params + 0.5 * update.params, [update])
        if not server.stopping:
            server.dispatch(update.client_id)


def run_until(sim, version: int, evaluate_at=()):
    """Step ``sim`` until ``version`` commits; ``sim.fairness()`` at each version in ``evaluate_at``."""
    seen = {}

    def observe(s):
        if s.version in evaluate_at:
            seen[s.version] = s.fairness()

    run_rounds(sim, version, observe)
    return seen


# --------------------------------------------------------------------------- the definitions
def test_jain_index_and_staleness_stats_by_hand():
    assert jain_index([1, 2, 3]) == pytest.approx(36 / (3 * 14))  # (1+2+3)^2 / (3 (1+4+9)) = 6/7
    assert jain_index([4, 4, 4, 4]) == 1.0
    assert jain_index([5, 0, 0, 0]) == 0.25  # one client does everything: 1/n
    assert jain_index([3, 3, 0, 0]) == 0.5  # k of n equally: k/n
    assert jain_index([0, 0]) is None and jain_index([]) is None
    # 10 updates: five of staleness 0, four of 1, one of 7
    stats = staleness_stats({0: 5, 1: 4, 7: 1})
    assert stats == {"mean": pytest.approx(1.1), "p90": 1, "max": 7}  # 9 of 10 are <= 1
    assert staleness_stats({0: 8, 3: 2})["p90"] == 3  # only 8 of 10 are <= 0
    assert staleness_stats({}) == {"mean": None, "p90": None, "max": None}


def test_fast_clients_are_the_top_tenth_by_flops_and_at_least_one():
    assert fastest([1.0, 3.0, 2.0]).tolist() == [1]
    assert sorted(fastest(list(range(20))).tolist()) == [18, 19]
    assert fastest([1.0] * 11).tolist() == [0, 1]  # ceil(1.1) = 2; ties: lower id first


def test_online_time_from_availability_windows():
    windows = [None, ((1.0, 3.0), (5.0, math.inf)), ((0.0, 2.0),)]
    online = DeviceTable.from_profiles(
        [DeviceProfile(c, 1.0, 1e9, 1e6, 1e6, 0.0, windows=w) for c, w in enumerate(windows)]
    ).online_seconds
    assert online(0.0).tolist() == [0.0, 0.0, 0.0]
    assert online(2.0).tolist() == [2.0, 1.0, 2.0]
    assert online(4.0).tolist() == [4.0, 2.0, 2.0]  # offline in [3, 5)
    assert online(7.5).tolist() == [7.5, 4.5, 2.0]  # 2 s in the first window, 2.5 s in the second


# --------------------------------------------------------------------------- the simulator's counters
def test_staleness_histogram_of_a_known_asynchronous_schedule():
    # the schedule of tests/test_interface.py: commits at t = 1 f, 2 f, 3 s, 3 f, 4 f, 5 f, 6 s, 6 f
    # (f fast, s slow); staleness at commit = version before the commit - the task's version:
    # slow: dispatched at v0, committed at v2 -> 2; dispatched at v3, committed at v6 -> 3
    # fast: 0, 0, then 1 (dispatched at v2, the slow update went in first), 0, 0, then 1 again
    sim = make_simulator(MixOnArrival(), [8, 8], [device(0, FAST), device(1, SLOW)])
    windows = run_until(sim, 8, evaluate_at=(4, 8))
    c = sim.counters
    assert c.staleness == {0: 4, 1: 2, 2: 1, 3: 1}
    assert windows[4]["staleness_mean"] == pytest.approx((0 + 0 + 2 + 1) / 4)  # v1..v4: 0, 0, 2, 1
    assert (windows[4]["staleness_p90"], windows[4]["staleness_max"]) == (2, 2)
    assert windows[8]["staleness_mean"] == pytest.approx((0 + 0 + 3 + 1) / 4)  # v5..v8: 0, 0, 3, 1
    assert (windows[8]["staleness_p90"], windows[8]["staleness_max"]) == (3, 3)
    assert sim.fairness()["staleness_mean"] is None  # nothing aggregated since the last window
    assert sim.fairness(window=False)["staleness_mean"] == pytest.approx(7 / 8)

    # participation: fast 6 updates, slow 2; Jain = 8^2 / (2 (36 + 4)) = 0.8
    assert c.participation.tolist() == [6, 2]
    assert windows[8]["participation_jain"] == pytest.approx(0.8)
    assert windows[8]["participated_frac"] == 1.0
    # tasks: fast at t = 0..5 (not after the last commit: the run was stopping), slow at t = 0, 3, 6
    assert c.dispatched.tolist() == [6, 3]
    # nobody ever waits: each client is sent straight back (slow's third task has just begun)
    assert sim.busy_time() == pytest.approx([6.0, 6.0])
    assert windows[8]["idle_frac"] == pytest.approx(0.0, abs=1e-9)


def test_a_fast_client_idles_while_a_round_waits_for_the_slow_one():
    # synchronous rounds of both clients: each round lasts 3 s; the fast client works 1 s of them
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [device(0, FAST), device(1, SLOW)])
    seen = run_until(sim, 3, evaluate_at=(1, 2, 3))
    for version in (1, 2, 3):
        record = seen[version]
        assert record["idle_fast_frac"] == pytest.approx(2 / 3)  # fastest 10% of 2 clients: the fast one
        assert record["idle_frac"] == pytest.approx((2 / 3 + 0) / 2)
        assert record["staleness_mean"] == 0 and record["staleness_max"] == 0  # synchronous: never stale
        assert record["participation_jain"] == pytest.approx(1.0)
    assert sim.now == pytest.approx(9.0)
    assert sim.busy_time() == pytest.approx([3.0, 9.0])

    # stopped by a time limit at 4.5 s, mid-round: the slow task in flight since 3 s counts 1.5 s busy
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [device(0, FAST), device(1, SLOW)])
    sim.max_sim_time_s = 4.5
    run_until(sim, 100)
    assert sim.stop_reason == "time limit" and sim.now == 4.5
    assert sim.busy_time() == pytest.approx([2.0, 4.5])
    assert sim.idle_fractions() == pytest.approx([2.5 / 4.5, 0.0])

    # a later time limit (as --resume --set max_sim_time_s does) delivers the slow update held back at 4.5 s
    sim.max_sim_time_s = None
    run_until(sim, 3)
    assert sim.now == pytest.approx(9.0) and sim.busy_time() == pytest.approx([3.0, 9.0])


def test_a_cancelled_task_counts_as_busy_until_the_deadline():
    # deadline 2 s: every round the fast client (1 s) makes it, the slow one (3 s) is cut at 2 s
    sim = make_simulator(FedAvg(clients_per_round=2, deadline_s=2.0), [8, 8], [device(0, FAST), device(1, SLOW)])
    seen = run_until(sim, 2, evaluate_at=(2,))
    assert sim.now == pytest.approx(4.0) and sim.counters.cancelled == 2
    assert sim.busy_time() == pytest.approx([2.0, 4.0])
    assert seen[2]["idle_frac"] == pytest.approx((0.5 + 0.0) / 2)
    assert sim.counters.participation.tolist() == [2, 0] and sim.counters.dispatched.tolist() == [2, 2]
    assert seen[2]["participation_jain"] == pytest.approx(0.5)  # (2 + 0)^2 / (2 * 4)
    assert seen[2]["participated_frac"] == 0.5


def test_a_lost_task_counts_as_busy_until_the_client_went_offline():
    # the slow client is online in [0, 2) and from 10 s on: its 3 s task is lost at 2 s
    slow = device(1, SLOW, windows=((0.0, 2.0), (10.0, math.inf)))
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [device(0, FAST), slow])
    seen = run_until(sim, 2, evaluate_at=(2,))
    # round 1 ends at 2 s (the fast update, the lost task); round 2, the fast client alone, at 3 s
    assert sim.now == pytest.approx(3.0) and sim.counters.failed == 1
    assert sim.busy_time() == pytest.approx([2.0, 2.0])
    # online: fast 3 s (idle 1/3); slow 2 s, all of it busy (idle 0)
    assert seen[2]["idle_frac"] == pytest.approx((1 / 3 + 0) / 2)
    assert seen[2]["idle_fast_frac"] == pytest.approx(1 / 3)


def test_idle_is_unknown_before_any_time_has_passed():
    sim = make_simulator(FedAvg(clients_per_round=2), [8, 8], [device(0, FAST), device(1, SLOW)])
    record = sim.fairness()
    assert record["idle_frac"] is None and record["idle_fast_frac"] is None
    assert record["participation_jain"] is None and record["participated_frac"] == 0.0
    assert record["staleness_mean"] is None


def test_counters_survive_a_checkpoint():
    def build():
        return make_simulator(MixOnArrival(), [8, 8, 8], [device(0, FAST), device(1, SLOW), device(2, FAST / 2)])

    straight = build()
    run_until(straight, 10, evaluate_at=(5,))

    first = build()  # checkpointed between events once 5 commits are made, as Run does
    first.on_commit = lambda s: s.fairness() if s.version == 5 else None
    while first.version < 5:
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state, buffer)
    buffer.seek(0)
    resumed = build()
    resumed.state = torch.load(buffer, weights_only=False)
    run_until(resumed, 10)

    a, b = straight.counters, resumed.counters
    assert a.staleness == b.staleness and a.staleness_window == b.staleness_window
    assert max(a.staleness) >= 1  # the schedule did produce stale updates
    for name in ("participation", "dispatched", "busy_s"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
    assert straight.fairness() == resumed.fairness()


# --------------------------------------------------------------------------- runs: records, summary, strategy keys
class CountingFedAvg(FedAvg):
    """FedAvg that reports one number of its own (module level: checkpoints pickle it)."""

    def metrics(self):
        return {"groups_formed": 2.0}


class CollidingFedAvg(FedAvg):
    def metrics(self):
        return {"accuracy": 1.0}


def tiny_config(**changes):
    raw = json.loads(json.dumps(TINY))
    raw.update(changes)
    return validate(raw)


def test_strategy_metrics_join_every_record_and_may_not_overwrite_the_engine(tmp_path):
    cfg = tiny_config()
    fed = build_federation(cfg)
    Run(cfg, tmp_path / "ok", fed, CountingFedAvg(clients_per_round=3), resume=False).execute(show_progress=False)
    records = read_metrics(tmp_path / "ok" / "metrics.jsonl")
    assert [r["groups_formed"] for r in records] == [2.0] * 4

    with pytest.raises(ValueError, match="'accuracy'.*rename it"):
        Run(cfg, tmp_path / "bad", fed, CollidingFedAvg(clients_per_round=3), resume=False)


def test_run_writes_the_new_fields_and_the_summary_agrees_with_them(tmp_path):
    summary = run_experiment(tiny_config(rounds=4), tmp_path / "run", show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["staleness_mean"] is None and first["idle_frac"] is None  # round 0, time 0
    assert last["staleness_max"] == 0 and 0 <= last["idle_fast_frac"] <= 1 and 0 < last["participation_jain"] <= 1
    on_disk = read_summary(tmp_path / "run" / "summary.json")
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["staleness_histogram"] == {"0": 12} and summary["staleness_mean"] == 0.0  # 4 rounds of 3
    assert sum(summary["participation"]) == 12 and len(summary["participation"]) == 6
    assert sum(summary["tasks_per_client"]) == 12 and len(summary["client_speed"]) == 6
    assert summary["participation_jain"] == pytest.approx(jain_index(summary["participation"]))
    for key in ("participation_jain", "participated_frac", "idle_fast_frac", "idle_frac"):
        assert summary[key] == last[key], key


def test_evaluation_every_s_takes_the_first_aggregation_of_each_time_window():
    from hetfl.config import EvaluationConfig

    ev = EvaluationConfig(every_s=10.0)
    # by hand: last evaluation at 3 s (window 0); 9.9 s is still window 0, 10.0 s opens window 1, 25 s window 2
    assert not ev.due(1, 9.9, 3.0) and ev.due(2, 10.0, 3.0) and ev.due(3, 25.0, 12.0) and not ev.due(4, 19.0, 12.0)
    assert ev.due(1, 0.5, None)  # nothing evaluated yet
    assert EvaluationConfig(every=3).due(6, 0.1, 0.0) and not EvaluationConfig(every=3).due(7, 99.0, 0.0)
    with pytest.raises(ValueError, match="every_s replaces evaluation.every"):
        EvaluationConfig(every=2, every_s=1.0)


def test_a_run_with_every_s_evaluates_once_per_window_of_simulated_time(tmp_path):
    every_s = 0.1  # a round takes about 0.036 simulated seconds here
    run_experiment(tiny_config(rounds=12, evaluation={"every_s": every_s, "target_accuracy": 0.2}), tmp_path / "run",
                   show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    windows = [math.floor(r["sim_time_s"] / every_s) for r in records[1:-1]]  # the initial and final ones are extra
    assert len(records) < 8 and windows == sorted(set(windows))  # far fewer than every round, one per window at most
    assert records[-1]["round"] == 12


# --------------------------------------------------------------------------- reports and the compare table
def test_report_draws_staleness_and_participation_and_rebuilds_a_killed_runs_summary(tmp_path):
    root = tmp_path / "cmp"
    run_experiment(tiny_config(rounds=3), root / "fedavg", show_progress=False)
    run_experiment(tiny_config(rounds=3, strategy={"name": "fedavg", "clients_per_round": 3, "deadline_s": 0.005}),
                   root / "deadline", show_progress=False)  # fmt: skip
    killed = root / "killed"
    killed.mkdir()
    lines = [  # 4 updates at staleness mean 1, then 2 at mean 4: the run's mean is (4 + 8) / 6 = 2
        {"round": 0, "sim_time_s": 0, "accuracy": 0.1, "updates": 0, "staleness_mean": None, "staleness_max": None},
        {"round": 1, "sim_time_s": 1, "accuracy": 0.2, "updates": 4, "staleness_mean": 1.0, "staleness_max": 2,
         "participation_jain": 0.5, "idle_fast_frac": 0.25},
        {"round": 2, "sim_time_s": 2, "accuracy": 0.3, "updates": 6, "staleness_mean": 4.0, "staleness_max": 5,
         "participation_jain": 0.75, "idle_fast_frac": 0.5, "idle_frac": 0.4},
    ]  # fmt: skip
    (killed / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    page = render_report(root).read_text()
    for image in ("staleness.png", "participation.png"):
        assert (root / image).stat().st_size > 10_000
        assert f'src="{image}"' in page
    assert "mean staleness" in page and "fast idle" in page and "Jain particip." in page
    assert "2.00" in page and "50%" in page and "0.75" in page  # the killed run, rebuilt from its lines

    from hetfl.results.report import _load_run

    rebuilt = _load_run(killed).summary
    assert rebuilt["staleness_mean"] == pytest.approx(2.0) and rebuilt["staleness_max"] == 5
    assert rebuilt["participation_jain"] == 0.75 and rebuilt["idle_frac"] == 0.4

    # a summary written before these fields existed: no new plot, a note, still a report
    old = tmp_path / "old"
    run_experiment(tiny_config(rounds=1), old, show_progress=False)
    summary = read_summary(old / "summary.json")
    for key in ("staleness_histogram", "participation", "tasks_per_client", "client_speed"):
        del summary[key]
    write_summary(old / "summary.json", summary)
    (old / "staleness.png").write_text("left by an earlier report")
    page = render_report(old).read_text()
    assert not (old / "staleness.png").exists() and "staleness.png" not in page
    assert "older hetfl" in page


def test_compare_table_has_the_new_columns_and_fits_120_columns():
    base = {"status": "completed", "final_accuracy": 0.9123, "best_accuracy": 0.93, "rounds_to_target": 1234,
            "sim_time_s": 7000.0, "wall_time_s": 3000.0, "bytes_up": 1.234e9, "bytes_down": 1.234e9}  # fmt: skip
    summaries = [
        {**base, "algorithm": "fedavg", "time_to_target_s": 1234.0, "staleness_mean": 0.0,
         "idle_fast_frac": 0.85, "participation_jain": 0.98},
        {**base, "algorithm": "fedcompass", "status": "interrupted", "time_to_target_s": 700.0,
         "staleness_mean": 7.034, "idle_fast_frac": 0.123, "participation_jain": 0.66},
        {**base, "algorithm": "fedbuff", "time_to_target_s": None, "staleness_mean": None,
         "idle_fast_frac": None, "participation_jain": None},
    ]  # fmt: skip
    console = Console(width=120, record=True)
    console.print(comparison_table(summaries, "duel"))
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 120
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith(("fed",))}
    assert set(rows) == {"fedavg", "fedcompass", "fedbuff"}  # one line each: nothing wrapped
    assert "stale" in text and "idle" in text and "Jain" in text
    assert rows["fedavg"].split()[-3:] == ["0.00", "85%", "0.98"]
    assert rows["fedcompass"].split()[-3:] == ["7.03", "12%", "0.66"]
    assert rows["fedbuff"].split()[-3:] == ["—", "—", "—"]


# --------------------------------------------------------------------------- the progress bar
def test_progress_follows_whichever_limit_is_nearer():
    assert progress(10, 100, 5.0, None) == (PROGRESS_TOTAL // 10, "10/100 rounds  sim 5.0 s")
    # an asynchronous run: 10 of 100 commits, but 50 of 100 simulated seconds
    done, text = progress(10, 100, 50.0, 100.0)
    assert done == PROGRESS_TOTAL // 2
    assert text == "sim 50.0 s / 1.7 min  10 rounds"  # time first, against its limit
    # bounded by time: rounds huge; the text never says 12/100000 rounds
    assert progress(12, 100_000, 300.0, 600.0) == (PROGRESS_TOTAL // 2, "sim 5.0 min / 10.0 min  12 rounds")
    done, text = progress(90, 100, 5.0, 100.0)
    assert done == PROGRESS_TOTAL * 9 // 10 and text == "90/100 rounds  sim 5.0 s / 1.7 min"  # rounds nearer theirs
    assert progress(100, 100, 120.0, 100.0)[0] == PROGRESS_TOTAL  # never past the end


def test_compare_table_shows_personal_accuracy_only_when_a_run_is_personalised():
    base = {"status": "completed", "final_accuracy": 0.9123, "best_accuracy": 0.93, "rounds_to_target": 12,
            "sim_time_s": 7000.0, "wall_time_s": 3000.0, "bytes_up": 1.234e9, "bytes_down": 1.234e9,
            "time_to_target_s": 1234.0, "staleness_mean": 0.0, "idle_fast_frac": 0.85, "participation_jain": 0.98}
    plain = [{**base, "algorithm": "fedavg"}]
    mixed = plain + [{**base, "algorithm": "fedper", "personal_acc_mean": 0.9876}]

    def render(summaries):
        console = Console(width=120, record=True)
        console.print(comparison_table(summaries, "t"))
        return console.export_text()

    assert "pers." not in render(plain)
    text = render(mixed)
    assert "pers." in text and max(len(line.rstrip()) for line in text.splitlines()) <= 120
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith("fed")}
    assert rows["fedper"][2:5] == ["0.9123", "0.9300", "0.9876"] and rows["fedavg"][4] == "—"


@pytest.mark.parametrize("strategy", ["fedavg", "ditto", "fedgh", "pfedgate", "hidenseek", "fedtiny"])
def test_every_field_a_run_writes_is_defined_in_docs_metrics(tmp_path, strategy):
    from pathlib import Path

    from hetfl.config import validate
    from hetfl.engine.run import run_experiment
    from tests.conftest import TINY

    raw = json.loads(json.dumps(TINY))
    raw["strategy"]["name"] = strategy
    summary = run_experiment(validate(raw), tmp_path / "r", show_progress=False)
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    missing = [key for key in [*record, *summary] if f"`{key}`" not in doc]
    assert not missing, f"define these in docs/metrics.md: {missing}"
