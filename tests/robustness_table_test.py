"""scripts/robustness_table.py on fake workdirs: mean +- sample std per row, paired differences
seed by seed (only the seeds both rows have), the chosen rows of the attack chain, the plot, and
the errors."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "robustness_table.py")
_spec = importlib.util.spec_from_file_location("robustness_table", SCRIPT)
robustness_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(robustness_table)


def _run(root, name, seed, worst8, clean=0.4, robust=True, old_format=False):
    workdir = root / f"{name}_seed{seed}"
    workdir.mkdir()
    r = {"seed": seed, "knn_top1": 0.3, "linear_top1": 0.4, "robust_examples": 100}
    if robust:
        # As results.json is written: keys sorted, so the chain's order is lost in the file.
        table = {"apgd-ce": {"1": 0.15, "8": worst8 + 0.01}, "pgd20": {"1": 0.2, "8": 0.3},
                 "worst": {"1": 0.1, "8": worst8}}
        if old_format:  # before the attack chain: PGD-20 and FGSM, no worst case
            table = {"pgd20": {"1": 0.2, "8": 0.3}, "fgsm": {"1": 0.25, "8": 0.1}}
        r.update(robust_clean_top1=clean, robust_seconds=12.0, robust_top1=table,
                 robust_top1_l2={"worst": {"0.25": 0.3, "0.5": 0.2}},
                 timings={"total_seconds": 300.0})
    (workdir / "results.json").write_text(json.dumps(r, sort_keys=True))


def test_rows_are_mean_and_sample_std_and_differences_are_paired(tmp_path):
    for seed, worst8 in enumerate([0.00, 0.02, 0.04]):
        _run(tmp_path, "a", seed, worst8)
    for seed, worst8 in [(1, 0.12), (2, 0.10)]:  # no seed 0: only seeds 1, 2 are paired
        _run(tmp_path, "b", seed, worst8)
    rows = [("A", robustness_table.load_runs(str(tmp_path / "a_seed*"))),
            ("B", robustness_table.load_runs(str(tmp_path / "b_seed*")))]
    text = robustness_table.tables(rows)  # default: the worst case only
    header = text.splitlines()[0]
    assert header.split(" | ")[5:] == ["worst 1/255", "worst 8/255 |"]
    # A's worst case at 8/255: 0, 2, 4 % -> mean 2.00, sample std 2.00; B: 12, 10 -> 11.00 +- 1.41.
    row_a = next(line for line in text.splitlines() if line.startswith("| A | 3 |"))
    row_b = next(line for line in text.splitlines() if line.startswith("| B | 2 |"))
    col = header.split(" | ").index("worst 8/255 |")
    assert row_a.split(" | ")[col] == "2.00 +- 2.00 |"
    assert row_b.split(" | ")[col] == "11.00 +- 1.41 |"
    # Paired B - A: seed 1 +10.0, seed 2 +6.0, mean +8.0 (not 11 - 2 = 9, the unpaired means).
    paired = text[text.index("Paired differences, B - A"):].splitlines()
    assert "seeds 1, 2" in paired[0]
    rows_by_seed = {line.split(" | ")[0]: line.split(" | ") for line in paired
                    if line.startswith("| ")}
    assert rows_by_seed["| 1"][col - 1] == "+10.0 |"
    assert rows_by_seed["| 2"][col - 1] == "+6.0 |"
    assert rows_by_seed["| mean"][col - 1] == "+8.0 |"


def test_chosen_attacks_in_the_given_order_and_l2():
    r = {"knn_top1": 0.3, "linear_top1": 0.4, "robust_clean_top1": 0.5,
         "robust_top1": {"apgd-ce": {"16": 0.01, "2": 0.2}, "pgd20": {"16": 0.05, "2": 0.3},
                         "worst": {"16": 0.0, "2": 0.1}},
         "robust_top1_l2": {"worst": {"0.5": 0.25, "0.25": 0.375}}}
    cols = robustness_table.columns(r, ("pgd20", "worst"))
    assert list(cols)[3:] == ["pgd20 2/255", "pgd20 16/255", "worst 2/255", "worst 16/255"]
    assert cols["pgd20 16/255"] == 5.0 and cols["worst 2/255"] == 10.0
    cols = robustness_table.columns(r, ("worst",), "l2")
    assert list(cols)[3:] == ["worst 0.25 (L2)", "worst 0.5 (L2)"] and cols["worst 0.5 (L2)"] == 25
    assert robustness_table.missing(r, ("worst", "square"), "linf").startswith("has no square")
    assert robustness_table.missing(r, ("pgd20",), "l2").startswith("has no pgd20")
    assert robustness_table.missing(r, ("pgd20", "worst"), "linf") == ""


def test_cli_writes_the_figure_and_refuses_runs_without_the_rows(tmp_path):
    _run(tmp_path, "a", 0, 0.0)
    _run(tmp_path, "a", 1, 0.1)
    figure = tmp_path / "fig.png"
    done = subprocess.run([sys.executable, SCRIPT, f"--run=A={tmp_path}/a_seed*",
                           "--attack=worst", "--attack=pgd20", f"--figure={figure}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = done.stdout.splitlines()[0]
    assert header.index("worst 8/255") < header.index("pgd20 1/255")
    _run(tmp_path, "c", 0, 0.0, robust=False)
    done = subprocess.run([sys.executable, SCRIPT, f"--run=C={tmp_path}/c_seed*"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "--mode=eval" in done.stderr
    # A run evaluated before the chain has PGD-20 (the same row then) but no worst case.
    _run(tmp_path, "o", 0, 0.0, old_format=True)
    done = subprocess.run([sys.executable, SCRIPT, f"--run=O={tmp_path}/o_seed*"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "has no worst" in done.stderr and "--mode=eval" in done.stderr
    done = subprocess.run([sys.executable, SCRIPT, f"--run=O={tmp_path}/o_seed*",
                           "--attack=pgd20"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, SCRIPT, f"--run=D={tmp_path}/nothing*"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "no workdir" in done.stderr


def test_results_files_count_like_workdirs(tmp_path):
    """A glob of kept results files (docs/results/.../<run>.json) reads as the workdirs would;
    a workdir's log file beside it (<run>.log) is not a run."""
    for seed, worst8 in [(0, 0.02), (1, 0.06)]:
        _run(tmp_path, "a", seed, worst8)
        (tmp_path / f"a_seed{seed}.log").write_text("not a run")
    kept = tmp_path / "kept"
    kept.mkdir()
    for seed in (0, 1):
        (kept / f"a_seed{seed}.json").write_text(
            (tmp_path / f"a_seed{seed}" / "results.json").read_text())
    from_files = robustness_table.load_runs(str(kept / "a_seed*.json"))
    assert sorted(from_files) == [0, 1]
    assert [from_files[s]["robust_top1"]["worst"]["8"] for s in (0, 1)] == [0.02, 0.06]
    assert from_files == robustness_table.load_runs(str(tmp_path / "a_seed*"))


def test_a_row_of_one_seed_shows_its_values_without_a_spread(tmp_path):
    _run(tmp_path, "a", 0, 0.05)
    text = robustness_table.tables([("A", robustness_table.load_runs(str(tmp_path / "a_seed*")))])
    assert text.splitlines()[2] == "| A | 1 | 30.00 | 40.00 | 40.00 | 10.00 | 5.00 |"
