"""scripts/robustness_table.py on fake workdirs: mean +- sample std per row, paired differences
seed by seed (only the seeds both rows have), the plot, and the errors."""

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


def _run(root, name, seed, pgd8, clean=0.4, robust=True):
    workdir = root / f"{name}_seed{seed}"
    workdir.mkdir()
    r = {"seed": seed, "knn_top1": 0.3, "linear_top1": 0.4, "robust_examples": 100}
    if robust:
        r.update(robust_clean_top1=clean, robust_seconds=12.0,
                 robust_top1={"pgd20": {"1": 0.2, "8": pgd8}, "fgsm": {"1": 0.25, "8": 0.1}},
                 timings={"total_seconds": 300.0})
    (workdir / "results.json").write_text(json.dumps(r))


def test_rows_are_mean_and_sample_std_and_differences_are_paired(tmp_path):
    for seed, pgd8 in enumerate([0.00, 0.02, 0.04]):
        _run(tmp_path, "a", seed, pgd8)
    for seed, pgd8 in [(1, 0.12), (2, 0.10)]:  # no seed 0: only seeds 1, 2 are paired
        _run(tmp_path, "b", seed, pgd8)
    rows = [("A", robustness_table.load_runs(str(tmp_path / "a_seed*"))),
            ("B", robustness_table.load_runs(str(tmp_path / "b_seed*")))]
    text = robustness_table.tables(rows)
    header = text.splitlines()[0]
    assert header.index("PGD20 8/255") < header.index("FGSM 1/255")
    # A's PGD-20 8/255: 0, 2, 4 % -> mean 2.00, sample std 2.00; B: 12, 10 -> 11.00 +- 1.41.
    row_a = next(line for line in text.splitlines() if line.startswith("| A | 3 |"))
    row_b = next(line for line in text.splitlines() if line.startswith("| B | 2 |"))
    col = header.split(" | ").index("PGD20 8/255")
    assert row_a.split(" | ")[col] == "2.00 +- 2.00"
    assert row_b.split(" | ")[col] == "11.00 +- 1.41"
    # Paired B - A: seed 1 +10.0, seed 2 +6.0, mean +8.0 (not 11 - 2 = 9, the unpaired means).
    paired = text[text.index("Paired differences, B - A"):].splitlines()
    assert "seeds 1, 2" in paired[0]
    rows_by_seed = {line.split(" | ")[0]: line.split(" | ") for line in paired
                    if line.startswith("| ")}
    assert rows_by_seed["| 1"][col - 1] == "+10.0"
    assert rows_by_seed["| 2"][col - 1] == "+6.0"
    assert rows_by_seed["| mean"][col - 1] == "+8.0"


def test_cli_writes_the_figure_and_refuses_runs_without_robust_numbers(tmp_path):
    _run(tmp_path, "a", 0, 0.0)
    _run(tmp_path, "a", 1, 0.1)
    figure = tmp_path / "fig.png"
    done = subprocess.run([sys.executable, SCRIPT, f"--run=A={tmp_path}/a_seed*",
                           f"--figure={figure}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _run(tmp_path, "c", 0, 0.0, robust=False)
    done = subprocess.run([sys.executable, SCRIPT, f"--run=C={tmp_path}/c_seed*"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "--mode=eval" in done.stderr
    done = subprocess.run([sys.executable, SCRIPT, f"--run=D={tmp_path}/nothing*"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "no workdir" in done.stderr
