"""Run folders people can manage: a fit never silently replaces a run, two fits never share a
folder, `probkit runs` lists and compares what the fits wrote, and fits stop when converged."""

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import torch
import pytest
from typer.testing import CliRunner

import probkit
from probkit.catalog import compare, list_runs
from probkit.cli import app
from probkit.infer.stopping import StoppingRule
from probkit.runs import LOCK

runner = CliRunner()
SPECS = Path(__file__).parent / "specs"
TINY = SPECS / "tiny-mixture.yaml"  # Adam, 10 steps
TINY_EM = SPECS / "tiny-em.yaml"
SMOOTH = SPECS / "tiny-smooth.yaml"  # L-BFGS


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _flat(result) -> str:
    return " ".join(result.output.split())


def _fit(run: Path, *extra, spec=TINY):
    result = _invoke("fit", spec, "--steps", 3, "--out", run, "--device", "cpu", "--no-progress", *extra)
    return result


def test_a_second_fit_into_a_run_is_refused_and_the_run_is_untouched(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK}
    result = _fit(run, "--seed", 5)
    assert result.exit_code == 2, result.output
    message = _flat(result)
    assert "already holds a fitted run (3 steps, held-out" in message
    for way in ("--resume", "--overwrite", "--out"):
        assert way in message
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK}
    assert after == before


def _outputs(run: Path) -> None:
    """What commands write into a run folder: samples, completions, clusters (a sub-folder)."""
    for command in (("sample", run, "-n", 4), ("complete", run, "--images", 2, "-k", 1),
                    ("cluster", run)):
        result = _invoke(*command, "--device", "cpu")
        assert result.exit_code == 0, result.output


def test_overwrite_removes_exactly_the_files_probkit_wrote_clusters_included(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    _outputs(run)
    listed = set(json.loads((run / "run.json").read_text())["files"])
    assert {"samples-4-seed0.png", "complete-half.npy", "clusters/clusters.json", "clusters/clusters-train.csv",
            "samples.png", "params.safetensors"} <= listed
    result = _fit(run, "--overwrite", "--seed", 5)
    assert result.exit_code == 0, result.output
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.name != LOCK}
    assert names == {"run.json", "params.safetensors", "checkpoint.safetensors", "history.csv", "spec.yaml",
                     "samples.png"}, names  # clusters/ went with its files
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 5 and set(info["files"]) == names


def test_a_run_folder_holding_a_file_probkit_did_not_write_is_refused_and_untouched(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    (run / "complete-half.png").write_bytes(b"mine")  # named like an output, but written by the user
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK}
    for option in ("--overwrite", "--resume"):
        result = _fit(run, option, "--steps", 6)
        assert result.exit_code == 2, result.output
        said = _flat(result)
        assert "files probkit did not write (complete-half.png, notes.txt)" in said and "--out" in said
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK} == before


def test_fit_out_a_folder_holding_the_spec_and_its_data_is_refused_and_deletes_nothing(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    np.save(project / "train.npy", (np.arange(40 * 64).reshape(40, 8, 8) % 2).astype(np.uint8))
    spec = project / "spec.yaml"
    spec.write_text(TINY.read_text().replace("source: digits", "source: train.npy"))
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    for extra in ((), ("--overwrite",), ("--resume",)):
        result = _fit(project, *extra, spec=spec)
        assert result.exit_code == 2, result.output
        said = _flat(result)
        if not extra or extra == ("--overwrite",):
            assert "holds the spec's data" in said and f"--out {project}-2" in said, said
        assert {p.name: p.read_bytes() for p in project.iterdir() if p.name != LOCK} == before


def test_a_run_from_before_the_file_list_is_credited_with_its_fixed_names_only(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    info = json.loads((run / "run.json").read_text())
    del info["files"]  # as an older probkit wrote it
    (run / "run.json").write_text(json.dumps(info))
    (run / "report.html").write_text("<html>")  # an older report, or the user's: nobody can tell
    result = _fit(run, "--overwrite")
    assert result.exit_code == 2 and "did not write (report.html)" in _flat(result)
    (run / "report.html").unlink()
    assert _fit(run, "--overwrite").exit_code == 0


def test_a_hand_edited_file_list_never_reaches_outside_the_run_folder(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    info = json.loads((run / "run.json").read_text())
    info["files"] += ["../victim.txt", str(victim)]
    (run / "run.json").write_text(json.dumps(info))
    assert _fit(run, "--overwrite").exit_code == 0
    assert victim.read_text() == "keep me"


def test_show_then_fit_keeps_the_programs_arrays_and_lists_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _invoke("show", TINY).exit_code == 0
    run = tmp_path / "runs" / "tiny-mixture"
    assert (run / "train.npz").exists()
    result = _invoke("fit", TINY, "--steps", 3, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "train.npz" in json.loads((run / "run.json").read_text())["files"]
    assert not (run / ".probkit-files.json").exists()


def test_an_interrupted_refit_never_mixes_the_old_run_with_the_new_checkpoint(tmp_path):
    run = tmp_path / "run"
    probkit.fit(TINY, steps=4, out=run, device="cpu", samples=0)

    def killed(step, loss, bpd):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probkit.fit(TINY, steps=10, out=run, device="cpu", samples=0, overwrite=True, seed=7, on_step=killed)
    # the old run is gone before the new fit wrote anything: what is left is the new fit's
    assert not (run / "run.json").exists() and not (run / "params.safetensors").exists()
    rows = list_runs(tmp_path)
    assert [(r.name, r.status) for r in rows] == [("run", "unfinished")]
    result = _fit(run, "--steps", 10)  # an unfinished fit is not replaced silently either
    assert result.exit_code == 2 and "unfinished fit" in _flat(result)
    resumed = probkit.fit(TINY, steps=10, out=run, device="cpu", samples=0, resume=True)
    assert resumed.history[-1]["step"] == 10 and json.loads((run / "run.json").read_text())["seed"] == 7


def test_resume_drops_what_was_made_from_the_old_params_but_keeps_the_run_if_it_cannot_start(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    _outputs(run)
    refused = _fit(run, "--resume", "--steps", 2)  # the checkpoint is at step 3 already
    assert refused.exit_code == 2 and (run / "run.json").exists() and (run / "complete-half.png").exists()
    assert _fit(run, "--resume", "--steps", 6).exit_code == 0
    assert not (run / "complete-half.png").exists() and not (run / "clusters").exists()
    assert not (run / "samples-4-seed0.png").exists()
    assert json.loads((run / "run.json").read_text())["steps_done"] == 6


@pytest.mark.parametrize("setup, options, message", [
    (lambda run: (run.mkdir(), (run / "holiday.jpg").write_bytes(b"x")), (),
     "holds files probkit did not write (holiday.jpg)"),
    (lambda run: run.write_text("a file"), (), "is a file, not a folder"),
    (lambda run: None, ("--resume",), "no checkpoint at"),
    (lambda run: None, ("--resume", "--overwrite"), "pick one"),
])
def test_folders_a_fit_cannot_use_are_refused_before_any_work(tmp_path, setup, options, message):
    run = tmp_path / "run"
    setup(run)
    result = _fit(run, *options)
    assert result.exit_code == 2, result.output
    assert message in _flat(result)


def test_two_fits_never_write_one_folder_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK, "a+") as held:  # another fit holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = _fit(run)
    assert result.exit_code == 2 and "another probkit fit is writing" in _flat(result)
    assert _fit(run).exit_code == 0  # the lock went with its holder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_place_is_refused_before_the_fit(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _fit(locked / "run")
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2 and "cannot write the run folder" in _flat(result)


def _three_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for name, seed, steps in (("a", 0, 3), ("b", 1, 6)):
        assert _fit(root / name, "--seed", seed, "--steps", steps).exit_code == 0
    (root / "broken").mkdir()
    (root / "broken" / "run.json").write_text("{not json")
    return root


def test_runs_lists_every_run_with_what_its_run_json_says(tmp_path):
    root = _three_runs(tmp_path)
    rows = {r.name: r for r in list_runs(root)}
    assert set(rows) == {"a", "b", "broken"} and rows["broken"].status == "damaged"
    for name in ("a", "b"):
        info = json.loads((root / name / "run.json").read_text())
        row = rows[name]
        assert row.status == "finished" and row.steps == info["steps_done"]
        assert row.held_out_bpd == info["test"]["bits_per_dim"] and row.baseline_bpd == 1.0
        assert row.spec_hash == info["spec_sha256"][:12] and row.date == info["fitted_at"]
    by_bits = [r.name for r in list_runs(root, sort="bits") if r.held_out_bpd is not None]
    assert by_bits == sorted(("a", "b"), key=lambda n: rows[n].held_out_bpd)
    result = _invoke("runs", "--dir", root, "--sort", "steps", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [r["name"] for r in listed if r["steps"] is not None] == ["a", "b"]
    table = _invoke("runs", "--dir", root)
    assert table.exit_code == 0 and "(damaged)" in table.output and f"{rows['b'].held_out_bpd:.4f}" in table.output


def test_runs_compares_two_runs_and_their_specs(tmp_path):
    root = _three_runs(tmp_path)
    rows = {r.name: r for r in list_runs(root)}
    table, diff = compare(rows["a"], rows["b"])
    differs = {label for label, _, _, d in table if d}
    assert {"seed", "steps", "held-out bits/dim", "spec hash"} <= differs and "data" not in differs
    assert "-  seed: 0\n" in diff and "+  seed: 1\n" in diff
    result = _invoke("runs", "a", "b", "--dir", root)
    assert result.exit_code == 0 and "+  seed: 1" in result.output
    for args, message in ((("a",), "give two runs"), (("a", "c"), "no run 'c'"), (("--sort", "speed"), "--sort speed")):
        bad = _invoke("runs", *args, "--dir", root)
        assert bad.exit_code == 2 and message in _flat(bad), bad.output


def test_stopping_rule_counts_quiet_steps_relative_to_the_loss():
    rule = StoppingRule(1e-3, patience=2)
    # 100 -> 99 moves 1%; 99 -> 98.95 and 98.95 -> 98.9 move 0.05% each: quiet, quiet
    assert [rule.update(v) for v in (100.0, 99.0, 98.95, 98.9)] == [False, False, False, True]
    never = StoppingRule(0.0, patience=1)
    assert not any(never.update(5.0) for _ in range(4))


def test_lbfgs_stops_when_converged_and_says_so(tmp_path):
    result = probkit.fit(SMOOTH, steps=50, out=tmp_path / "run", device="cpu", samples=0)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["tolerance"] == 1e-7 and info["steps_done"] < 50 and "converged at step" in info["stopped"]
    assert "2 steps in a row change the loss" in result.stopped


def test_a_resumed_em_fit_stops_where_an_uninterrupted_one_does(tmp_path, write_spec):
    # a checkpoint every step, so one falls inside the last quiet steps before convergence
    spec = write_spec(TINY_EM.read_text().replace("  steps: 200", "  steps: 200\n  eval_every: 1"))
    whole = probkit.fit(spec, out=tmp_path / "whole", device="cpu", samples=0)
    last = whole.history[-1]["step"]
    assert "converged" in whole.stopped and last < 200

    def killed(step, loss, bpd):
        if step == last - 1:  # its checkpoint holds the stopping rule's count of quiet steps
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probkit.fit(spec, out=tmp_path / "part", device="cpu", samples=0, on_step=killed)
    resumed = probkit.fit(spec, out=tmp_path / "part", device="cpu", samples=0, resume=True)
    assert resumed.history[-1]["step"] == last and resumed.stopped == whole.stopped


def _rewrite_meta(path: Path, **changes: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, **changes})


def _recast(path: Path, dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    save_file({k: v.to(dtype) for k, v in load_file(str(path)).items()}, str(path), metadata=meta)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(b"\x00" * 40), "cannot read the checkpoint"),
    (lambda path: _rewrite_meta(path, step="-3"), "not a step count"),
    (lambda path: _recast(path, torch.float16), "not the float32 a fit writes"),
    (lambda path: _recast(path, torch.int64), "not the float32 a fit writes"),
])
def test_a_damaged_checkpoint_is_refused_on_resume_with_the_file_named(tmp_path, damage, message):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    damage(run / "checkpoint.safetensors")
    result = _fit(run, "--resume", "--steps", 6)
    assert result.exit_code == 1, result.output
    assert message in _flat(result) and "checkpoint.safetensors" in _flat(result)


def test_evaluate_and_complete_refuse_a_run_whose_data_changed_since_the_fit(tmp_path, write_spec):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    spec = write_spec(TINY.read_text().replace("source: digits", "source: images.npy"),
                      name="own")
    run = tmp_path / "run"
    assert _fit(run, spec=spec).exit_code == 0
    assert _invoke("evaluate", run, "--json").exit_code == 0
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))  # other images
    for command in (("evaluate", run), ("complete", run, "--out", tmp_path)):
        result = _invoke(*command)
        assert result.exit_code == 1, result.output
        assert "the data changed since the fit" in _flat(result) and "run.json" in _flat(result)
    assert _invoke("sample", run, "-n", 4, "--out", tmp_path).exit_code == 0  # draws need no data


def test_complete_bounds_its_counts_before_any_work(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    for k, message in ((100000, "-k must be between 1 and 1,000 completions per image, found 100000"),
                       (0, "-k must be between 1 and 1,000")):
        result = _invoke("complete", run, "-k", k, "--out", tmp_path)
        assert result.exit_code == 2 and message in _flat(result), result.output
    result = _invoke("complete", run, "-k", 1000, "--images", 2, "--out", tmp_path, "--json")  # the bound itself
    assert result.exit_code == 0, result.output


def test_an_lbfgs_fit_killed_and_resumed_ends_where_the_uninterrupted_one_does(tmp_path, write_spec):
    """L-BFGS's memory of directions and steps is in the checkpoint, not rebuilt from scratch."""
    text = TINY.read_text().replace("optimizer: adam", "optimizer: lbfgs").replace("lr: 0.05", "lr: 0.5")
    spec = write_spec(text.replace("  steps: 10", "  steps: 8\n  eval_every: 1\n  tolerance: 0"), name="lbfgs")
    whole = probkit.fit(spec, out=tmp_path / "whole", device="cpu", samples=0)

    def killed(step, loss, bpd):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probkit.fit(spec, out=tmp_path / "part", device="cpu", samples=0, on_step=killed)
    resumed = probkit.fit(spec, out=tmp_path / "part", device="cpu", samples=0, resume=True)
    for name, value in whole.values.items():
        assert torch.equal(resumed.values[name], value), name


def test_sample_and_complete_refuse_an_out_they_cannot_write_with_exit_2(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for command in (("sample", run, "-n", 4), ("complete", run, "--images", 2)):
        result = _invoke(*command, "--out", blocker / "x.png")
        assert result.exit_code == 2, result.output
        assert "cannot write there" in _flat(result) and "a-file" in _flat(result)


@pytest.mark.parametrize("damage", [
    lambda text: "step,loss\nthree,NaN-ish\n",
    lambda text: text[: text.rindex(",")],  # the last line cut off (was a TypeError when resuming)
])
def test_a_damaged_history_is_refused_on_resume_with_the_file_named(tmp_path, damage):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    (run / "history.csv").write_text(damage((run / "history.csv").read_text()))
    result = _fit(run, "--resume", "--steps", 6)
    assert result.exit_code == 1 and "history.csv: cannot read the fit's history" in _flat(result), result.output


def test_a_full_disk_is_said_plainly():
    import errno

    from probkit.terminal import internal_failure

    message = internal_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert message.startswith("the disk is full") and "last good checkpoint" in message


def test_a_folder_mixing_two_fits_is_refused_naming_the_file(tmp_path):
    """Every file a fit writes carries its run id; params of another fit are not used as this one's."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert _fit(first).exit_code == 0 and _fit(second, "--seed", 4).exit_code == 0
    ids = {json.loads((run / "run.json").read_text())["run_id"] for run in (first, second)}
    assert len(ids) == 2
    (first / "params.safetensors").write_bytes((second / "params.safetensors").read_bytes())
    result = _invoke("sample", first, "-n", 4, "--out", tmp_path)
    assert result.exit_code == 1 and "params.safetensors belongs to another fit" in _flat(result), result.output


def test_a_resumed_run_keeps_its_run_id(tmp_path):
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    before = json.loads((run / "run.json").read_text())["run_id"]
    assert _fit(run, "--resume", "--steps", 5).exit_code == 0
    assert json.loads((run / "run.json").read_text())["run_id"] == before


def test_atomic_write_replaces_only_regular_files(tmp_path):
    from probkit.runs import atomic_write

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError, match="exists and is not a regular file"):
        atomic_write(tmp_path / "pipe", b"data")
    assert not (tmp_path / "pipe").is_file()
    atomic_write(tmp_path / "file", b"one")
    atomic_write(tmp_path / "file", b"two")
    assert (tmp_path / "file").read_bytes() == b"two"


def test_runs_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    result = _invoke("runs", "--dir", tmp_path / "notes.txt")
    assert result.exit_code == 2, result.output
    assert "--dir" in _flat(result) and "is a file, not a folder" in _flat(result)


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "run.json").write_text("[1, 2]"), r"run\.json is not the JSON object a fit writes"),
    (lambda run: (run / "run.json").write_text('{"spec_dir": 5}'), r"run\.json is not the JSON object a fit writes"),
    (lambda run: (run / "run.json").write_text('{"data": "digits"}'), r"run\.json is not the JSON object a fit"),
    (lambda run: ((run / "params.safetensors").unlink(), os.mkfifo(run / "params.safetensors")),
     r"params\.safetensors: params\.safetensors is not a regular file"),
    (lambda run: (run / "spec.yaml").write_bytes(b"\xff\xfe"), r"spec\.yaml: 'utf-8' codec can't decode"),
])
def test_a_damaged_run_file_is_refused_naming_it_never_read_as_it_is(tmp_path, damage, message):
    """A run.json that is not an object was an AttributeError, and a pipe in place of the params
    blocked every command for ever."""
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    damage(run)
    for command in (("sample", run, "-n", 2, "--out", tmp_path), ("evaluate", run)):
        result = _invoke(*command)
        assert result.exit_code == 1, result.output
        assert __import__("re").search(message, _flat(result)) and "fit again" in _flat(result), result.output


def test_a_folder_or_a_pipe_in_place_of_a_run_file_is_refused_before_the_fit_and_kept(tmp_path):
    """Found at the end of the fit, when the params were written (or removed as a stale file), these
    were tracebacks after the work."""
    run = tmp_path / "run"
    assert _fit(run).exit_code == 0
    (run / "run.json").unlink()
    (run / "run.json").mkdir()
    (run / "run.json" / "mine.txt").write_text("kept")
    (run / "params.safetensors").unlink()
    os.mkfifo(run / "params.safetensors")
    for extra in (("--resume", "--steps", 4), ("--overwrite",)):
        result = _fit(run, *extra)
        assert result.exit_code == 2, result.output
        assert "run.json: is a folder where the run keeps a file" in _flat(result)
    (run / "run.json" / "mine.txt").unlink()
    (run / "run.json").rmdir()
    result = _fit(run, "--resume", "--steps", 4)
    assert result.exit_code == 2 and "params.safetensors: is a pipe, a device or a socket" in _flat(result)
    assert not (run / "params.safetensors").is_file()
    (run / "params.safetensors").unlink()
    (run / "samples.png").unlink()
    os.mkfifo(run / "samples.png")  # the grid a fit draws at its end
    result = _fit(run, "--resume", "--steps", 4)
    assert result.exit_code == 2 and "samples.png: is a pipe, a device or a socket" in _flat(result)


def test_a_pipe_in_place_of_the_history_is_refused_not_read(tmp_path):
    """`probkit report` and `fit --resume` read history.csv: a pipe there blocked them for ever."""
    from probkit.errors import RunError
    from probkit.runs import read_history

    os.mkfifo(tmp_path / "history.csv")
    with pytest.raises(RunError, match=r"history\.csv: cannot read the fit's history \(OSError: history\.csv is not a "
                                       r"regular file\)"):
        read_history(tmp_path / "history.csv")


def test_runs_lists_a_folder_with_a_pipe_for_its_run_json_as_damaged_without_reading_it(tmp_path):
    (tmp_path / "a").mkdir()
    os.mkfifo(tmp_path / "a" / "run.json")
    (tmp_path / "b").mkdir()
    os.mkfifo(tmp_path / "b" / "checkpoint.safetensors")
    rows = {row.name: row.status for row in list_runs(tmp_path)}
    assert rows == {"a": "damaged", "b": "damaged"}


@pytest.mark.parametrize("command", [["evaluate"], ["report"], ["sample", "-n", "4"], ["compress", "--out", "x.pkz"],
                                     ["cluster"], ["complete"]])
def test_a_killed_fit_is_unfinished_and_resume_is_suggested(tmp_path, monkeypatch, command):
    """A fit killed before it wrote run.json leaves a checkpoint: every command that reads a run
    says the run is unfinished and how to finish it (exit 2), for a folder and for a spec."""
    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "tiny-mixture"
    assert _fit(run).exit_code == 0
    for name in ("run.json", "params.safetensors", "spec.yaml"):  # what a fit writes only when it finishes
        (run / name).unlink()
    result = _invoke(command[0], run, *command[1:])
    assert result.exit_code == 2, result.output
    assert "unfinished fit" in _flat(result) and f"probkit fit SPEC --resume --out {run}" in _flat(result)
    result = _invoke(command[0], TINY, *command[1:])
    assert result.exit_code == 2, result.output
    assert f"probkit fit {TINY} --resume`" in _flat(result)
    assert "internally" not in result.output


def test_a_refused_fit_shows_no_progress_bar(tmp_path):
    """The refusal comes before the bar: no heading and no empty bar above the error."""
    run = tmp_path / "run"
    shown = _invoke("fit", TINY, "--steps", 3, "--out", run, "--device", "cpu")
    assert shown.exit_code == 0 and "at most 3 steps" in shown.output and "3/3" in shown.output, shown.output
    refused = _invoke("fit", TINY, "--steps", 3, "--out", run, "--device", "cpu")
    assert refused.exit_code == 2, refused.output
    assert "at most" not in refused.output and "0/3" not in refused.output and "loss" not in refused.output
    assert refused.output.lstrip().startswith("error:"), refused.output


@pytest.mark.parametrize("width", [80, 120])
def test_runs_keeps_the_run_name_whole_in_a_narrow_terminal(tmp_path, monkeypatch, width):
    """A long run name with a data path as its source: at 80 columns the name is whole, the
    path is cut in its middle, and no line is wider than the terminal."""
    from probkit import cli

    images = tmp_path / "a-rather-long-folder-name" / "with-more-folders" / "train-images.npy"
    images.parent.mkdir(parents=True)
    np.save(images, (np.random.default_rng(0).random((40, 8, 8)) > 0.5).astype(np.float32))
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY.read_text().replace("source: digits", f"source: {images}").replace(
        "name: tiny-mixture", "name: a-mixture-with-a-long-descriptive-name"))
    assert _fit(tmp_path / "runs" / "a-mixture-with-a-long-descriptive-name", spec=spec).exit_code == 0
    monkeypatch.setattr(cli.console, "width", width)
    result = _invoke("runs", "--dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "a-mixture-with-a-long-descriptive-name" in result.output and "…" in result.output, result.output
    assert max(len(line) for line in result.output.splitlines()) <= width, result.output


def test_datasets_is_one_line_a_set_at_80_columns(monkeypatch):
    from probkit import cli

    monkeypatch.setattr(cli.console, "width", 80)
    result = _invoke("datasets")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("digits", "mnist", "faces", "textures", "wallpaper"):
        assert sum(line.split()[:1] == [name] for line in lines) == 1, result.output
    assert len(lines) <= 12 and max(len(line) for line in lines) <= 80, result.output
    result = _invoke("datasets", "digits")
    assert result.exit_code == 0 and "UCI optical digits, CC BY 4.0" in result.output, result.output


def test_a_spec_edited_since_its_fit_is_refused_by_every_command_that_reads_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "mixture.yaml"
    spec.write_text(TINY.read_text())
    assert _invoke("fit", spec, "--steps", 3, "--device", "cpu", "--no-progress").exit_code == 0
    spec.write_text("# a comment, and the keys in their places\n" + TINY.read_text().replace("K: 3", "K:  3"))
    assert _invoke("sample", spec, "-n", 2, "--device", "cpu").exit_code == 0  # the same spec, said differently
    spec.write_text(TINY.read_text().replace("K: 3", "K: 4"))
    for command in (("sample", spec, "-n", 2), ("evaluate", spec), ("complete", spec, "--images", 1),
                    ("cluster", spec), ("compress", spec, "--out", "x.pkz"), ("report", spec),
                    ("denoise", spec, "--noise", "flip:0.1"), ("upscale", spec)):
        result = _invoke(*command, "--device", "cpu")
        said = _flat(result)
        assert result.exit_code == 2, (command, result.output)
        assert "constants.K: 4 here, 3 in the run" in said, said
        for way in ("--overwrite", "--out runs/tiny-mixture-2", "passing its folder"):
            assert way in said, said
    assert not (tmp_path / "x.pkz").exists()
    assert _invoke("sample", tmp_path / "runs" / "tiny-mixture", "-n", 2, "--device", "cpu").exit_code == 0


def test_options_that_overrode_the_fit_block_do_not_make_the_spec_another(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _invoke("fit", TINY, "--steps", 2, "--seed", 4, "--device", "cpu", "--no-progress").exit_code == 0
    assert _invoke("evaluate", TINY, "--device", "cpu").exit_code == 0
