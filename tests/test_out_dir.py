"""``--out`` never destroys data (hetfl.results.outdir): ``hetfl run``, ``hetfl compare`` and ``hetfl server`` write
only into a new or empty folder or an earlier run of hetfl's, replace a run only with ``--overwrite`` (``--fresh``
for the server, which otherwise resumes), and then only hetfl's own files. Every refusal is one line, exit 2,
nothing touched: the files and the run index's rows are compared byte for byte.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import write_config
from hetfl.cli import main
from hetfl.engine import run as engine_run
from hetfl.results import INDEX_NAME
from hetfl.results.outdir import folder_name, inspect


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    """Run ``hetfl argv``, which must be refused: exit 2, one line on stderr; that line."""
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the run index included when it is the folder's parent's: see rows)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(index: Path) -> list[tuple]:
    """The run index's rows, in path order."""
    if not index.is_file():
        return []
    with sqlite3.connect(index) as conn:
        return conn.execute("SELECT * FROM runs ORDER BY path").fetchall()


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


# --------------------------------------------------------------------------- hetfl run
def test_a_finished_run_is_refused_and_left_as_it_was(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "results" / "run"
    assert cli(capsys, "run", config, "--out", out, "--quiet")[0] == 0
    files, index = snapshot(out), rows(out.parent / INDEX_NAME)
    assert len(index) == 1
    line = refused(capsys, "run", config, "--out", out, "--quiet", "--set", "seed=5")
    assert line == f"error: --out {out}: holds a completed run of fedavg, 3 rounds; add --overwrite to replace it, or give another folder"
    assert snapshot(out) == files and rows(out.parent / INDEX_NAME) == index


def test_overwrite_replaces_only_hetfls_own_files(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "results" / "run"
    assert cli(capsys, "run", config, "--out", out, "--quiet")[0] == 0
    assert cli(capsys, "report", out)[0] == 0
    assert (out / "report.html").is_file() and (out / "accuracy_vs_time.png").is_file()
    (out / "notes.txt").write_text("what I tried")
    (out / "extra").mkdir()
    (out / "extra" / "figure.svg").write_text("<svg/>")
    before = summary(out)

    assert cli(capsys, "run", config, "--out", out, "--quiet", "--overwrite", "--set", "seed=7")[0] == 0
    after = summary(out)
    assert after["seed"] == 7 and before["seed"] == 0 and after["started_at"] >= before["started_at"]
    assert (out / "notes.txt").read_text() == "what I tried" and (out / "extra" / "figure.svg").read_text() == "<svg/>"
    assert not (out / "report.html").exists() and not (out / "accuracy_vs_time.png").exists()  # the old run's report
    index = rows(out.parent / INDEX_NAME)
    assert len(index) == 1 and 7 in index[0]  # the row was replaced, not added to


def test_a_mistake_with_overwrite_still_touches_nothing(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "results" / "run"
    assert cli(capsys, "run", config, "--out", out, "--quiet")[0] == 0
    files, index = snapshot(out), rows(out.parent / INDEX_NAME)
    for mistake in (["--set", "strategy.name=fedbest"], ["--set", "data.n_clients=5000"], ["--set", "rounds=0"]):
        refused(capsys, "run", config, "--out", out, "--quiet", "--overwrite", *mistake)
        assert snapshot(out) == files and rows(out.parent / INDEX_NAME) == index, mistake


def test_an_interrupted_run_is_refused_with_the_way_to_resume_it(tmp_path, capsys, monkeypatch):
    config, out = write_config(tmp_path, rounds=6), tmp_path / "run"
    evaluate = engine_run.Run.evaluate

    def interrupted(self):
        if self.sim.version == 4:
            raise KeyboardInterrupt
        return evaluate(self)

    with monkeypatch.context() as patch:
        patch.setattr(engine_run.Run, "evaluate", interrupted)
        assert cli(capsys, "run", config, "--out", out, "--quiet")[0] == 130
    files = snapshot(out)
    line = refused(capsys, "run", config, "--out", out, "--quiet")
    assert f"holds an interrupted run of fedavg, 4 rounds; continue it with hetfl run --resume {out}, add --overwrite" in line
    assert snapshot(out) == files
    assert refused(capsys, "run", "--resume", out, "--overwrite").startswith("error: hetfl run: --overwrite replaces")
    assert cli(capsys, "run", "--resume", out, "--quiet")[0] == 0 and summary(out)["rounds"] == 6


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path, capsys):
    mine = tmp_path / "experiments"
    mine.mkdir()
    config = write_config(mine)  # the user's own config.yaml lives here: writing a run here would overwrite it
    (mine / "data.csv").write_text("x,y\n1,0\n")
    files = snapshot(mine)
    for extra in ([], ["--overwrite"]):
        line = refused(capsys, "run", config, "--out", mine, "--quiet", *extra)
        assert line == (f"error: --out {mine}: holds files that are not a hetfl run (config.yaml, data.csv); hetfl "
                        "writes only into a new or empty folder or an earlier run, so give another folder")
        assert snapshot(mine) == files
    assert not (tmp_path / INDEX_NAME).exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "run", config, "--out", empty, "--quiet")[0] == 0  # an empty folder is fine
    assert summary(empty)["status"] == "completed"


def test_root_home_and_the_current_folder_are_refused(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(engine_run, "build_federation", never)
    config = write_config(tmp_path)
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    for out, what in (("/", "the root of the file system"), (str(home), "your home folder"), ("~", "your home folder"),
                      (".", "the current folder"), (str(here), "the current folder"), ("sub/..", "the current folder")):
        for extra in ([], ["--overwrite"]):
            line = refused(capsys, "run", config, "--out", out, "--quiet", *extra)
            assert line == f"error: --out {out}: is {what}; give a folder of its own, e.g. --out results/NAME", line
        line = refused(capsys, "compare", config, "--algorithms", "fedavg", "--out", out, "--quiet")
        assert f"is {what}" in line
    assert list(here.iterdir()) == [] and list(home.iterdir()) == []


def test_a_folder_of_runs_is_not_a_run(tmp_path, capsys):
    config, results = write_config(tmp_path), tmp_path / "results"
    assert cli(capsys, "run", config, "--out", results / "a", "--quiet")[0] == 0
    files = snapshot(results)
    line = refused(capsys, "run", config, "--out", results, "--quiet", "--overwrite")
    assert "holds other runs (runs a), not one run; give a folder of its own" in line
    line = refused(capsys, "compare", config, "--algorithms", "fedavg,fedprox", "--out", results, "--overwrite")
    assert "holds other runs (runs a), not a comparison" in line
    assert snapshot(results) == files


# --------------------------------------------------------------------------- hetfl compare
def test_compare_checks_every_folder_before_the_first_run(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "cmp"
    (out / "fedprox").mkdir(parents=True)
    (out / "fedprox" / "todo.md").write_text("compare with mu 0.1")
    line = refused(capsys, "compare", config, "--algorithms", "fedavg,fedprox", "--out", out, "--quiet", "--overwrite")
    assert "holds files that are not a hetfl run (fedprox)" in line  # a folder of the user's, not a comparison
    assert sorted(p.name for p in out.iterdir()) == ["fedprox"]

    (out / "fedprox").rename(tmp_path / "todo")
    assert cli(capsys, "compare", config, "--algorithms", "fedavg,fedprox", "--out", out, "--quiet")[0] == 0
    (out / "fednova").mkdir()
    (out / "fednova" / "todo.md").write_text("compare with fednova")  # the user's, where fednova's run would go
    files, index = snapshot(out), rows(out / INDEX_NAME)
    line = refused(capsys, "compare", config, "--algorithms", "fedavg,fednova", "--out", out, "--quiet", "--overwrite")
    assert "its folder fednova holds files that are not a hetfl run (todo.md)" in line
    assert snapshot(out) == files and rows(out / INDEX_NAME) == index  # fedavg did not run first


def test_compare_replaces_an_earlier_comparison_only_with_overwrite(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "cmp"
    assert cli(capsys, "compare", config, "--algorithms", "fedavg,fedprox", "--out", out, "--quiet")[0] == 0
    (out / "README.md").write_text("my comparison")
    (out / "fedprox" / "notes.txt").write_text("mu too small?")
    files, index = snapshot(out), rows(out / INDEX_NAME)
    assert len(index) == 2
    line = refused(capsys, "compare", config, "--algorithms", "fedavg,fednova", "--out", out, "--quiet")
    assert line == (f"error: --out {out}: holds an earlier comparison (runs fedavg, fedprox); add --overwrite to "
                    "replace it, or give another folder")
    assert snapshot(out) == files and rows(out / INDEX_NAME) == index

    assert cli(capsys, "compare", config, "--algorithms", "fedavg,fednova", "--out", out, "--quiet", "--overwrite")[0] == 0
    assert [s["algorithm"] for s in json.loads((out / "comparison.json").read_text())] == ["fedavg", "fednova"]
    assert (out / "README.md").read_text() == "my comparison"
    assert sorted(p.name for p in (out / "fedprox").iterdir()) == ["notes.txt"]  # fedprox's run went; the note stays
    assert sorted(Path(r[0]).name for r in rows(out / INDEX_NAME)) == ["fedavg", "fednova"]
    assert inspect(out / "fedprox").kind == "other"


def test_compare_after_a_comparison_that_did_not_finish(tmp_path, capsys):
    config, out = write_config(tmp_path), tmp_path / "cmp"
    assert cli(capsys, "compare", config, "--algorithms", "fedavg,fedprox", "--out", out, "--quiet")[0] == 0
    (out / "comparison.json").unlink()  # as if it had died before writing it
    line = refused(capsys, "compare", config, "--algorithms", "fedavg,fedprox", "--out", out, "--quiet")
    assert "holds runs of these algorithms (runs fedavg, fedprox) from a comparison that did not finish" in line
    assert cli(capsys, "compare", config, "--algorithms", "fedprox,fedavg", "--out", out, "--quiet", "--overwrite")[0] == 0
    assert [s["algorithm"] for s in json.loads((out / "comparison.json").read_text())] == ["fedprox", "fedavg"]


# --------------------------------------------------------------------------- hetfl server
def test_server_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    config = write_config(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    line = refused(capsys, "server", config, "--out", mine, "--tokens", tmp_path / "no-tokens.yaml", "--fresh")
    assert line.startswith(f"error: --out {mine}: holds files that are not a hetfl run (keep.txt)")
    assert (mine / "keep.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    line = refused(capsys, "server", config, "--out", tmp_path, "--tokens", tmp_path / "no-tokens.yaml")
    assert "holds files that are not a hetfl run" in line  # the config's own folder


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(("algorithm", "folder"), [
    ("fedavg", "fedavg"), ("mystrats:FedAvgM", "mystrats.FedAvgM"), ("pkg.sub:Outer.Inner", "pkg.sub.Outer.Inner"),
])
def test_a_comparisons_run_folder_is_named_after_the_algorithm(algorithm, folder):
    assert folder_name(algorithm) == folder
