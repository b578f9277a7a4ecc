"""The results pages (docs/results/**/README.md) are what scripts/results_pages.py generates from
the kept run files, and their numbers are the files' numbers (recomputed here with numpy)."""

import glob
import importlib.util
import json
import os
import re

import numpy as np

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location(
        "results_pages", os.path.join(REPO, "scripts", "results_pages.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_pages = _load()


def test_every_results_page_is_what_the_kept_files_give():
    generated = results_pages.generate()
    for path, text in generated.items():
        with open(path, encoding="utf-8") as f:
            assert f.read() == text, (f"{os.path.relpath(path, REPO)} differs from its run files:"
                                      " run python scripts/results_pages.py")
    # Every folder of kept runs has its generated page, and no page there is written by hand.
    kept = {os.path.dirname(os.path.dirname(os.path.dirname(p))) for p in glob.glob(
        os.path.join(REPO, "docs", "results", "*", "runs", "*", "results.json"))}
    pages = glob.glob(os.path.join(REPO, "docs", "results", "**", "*.md"), recursive=True)
    assert {os.path.dirname(p) for p in generated} >= kept
    assert sorted(pages) == sorted(generated)


def _column(name, method, adversarial, key):
    values = []
    for path in glob.glob(os.path.join(REPO, "docs", "results", name, "runs", "*")):
        with open(os.path.join(path, "flags.cfg")) as f:
            lines = f.read().splitlines()
        if f"--method={method}" in lines and ("--adversarial" in lines) == adversarial:
            with open(os.path.join(path, "results.json")) as f:
                values.append(json.load(f)[key])
    return np.array(values)


def test_the_full_cifar10_page_shows_the_means_of_its_files():
    with open(os.path.join(REPO, "docs", "results", "cifar10_full", "README.md")) as f:
        text = f.read()
    for adversarial, label in ((False, "SimCLR"), (True, "SimCLR+CLAE")):
        knn = 100 * _column("cifar10_full", "simclr", adversarial, "knn_top1")
        linear = 100 * _column("cifar10_full", "simclr", adversarial, "linear_top1")
        assert len(knn) == 3
        row = (f"| {label} | 0,1,2 | {knn.mean():.2f} ± {knn.std(ddof=1):.2f} | "
               f"{linear.mean():.2f} ± {linear.std(ddof=1):.2f} |")
        assert row in text
    assert "/tmp" not in text


def test_the_check_mode_names_a_stale_page(tmp_path, monkeypatch, capsys):
    page = os.path.join(REPO, "docs", "results", "cifar10_full", "README.md")
    real = results_pages.generate
    monkeypatch.setattr(results_pages, "generate",
                        lambda: {**real(), page: real()[page] + "one more line\n"})
    assert results_pages.main(["--check"]) == 1
    assert "differs: " in capsys.readouterr().out


def _readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def _first_runs():
    out = {}
    for path in glob.glob(os.path.join(REPO, "docs", "results", "first_run", "runs", "*",
                                       "results.json")):
        with open(path) as f:
            results = json.load(f)
        out[results["seed"]] = results
    return out


def test_the_readmes_first_run_block_is_the_kept_seed_0_run():
    seed0 = _first_runs()[0]
    line = (f"kNN top-1:    {seed0['knn_top1']:.4f}   linear top-1: {seed0['linear_top1']:.4f}   "
            f"(step {seed0['step']}, {seed0['test_examples']} test images)")
    assert line in _readme().splitlines()


def test_the_readmes_first_run_range_holds_every_kept_seed():
    runs = _first_runs()
    assert sorted(runs) == [0, 1, 2]
    match = re.search(r"kNN top-1 from ([\d.]+) to ([\d.]+) and linear top-1 from ([\d.]+) to "
                      r"([\d.]+)", _readme().replace("\n", " "))
    assert match, "the README states the first command's range"
    knn_lo, knn_hi, lin_lo, lin_hi = map(float, match.groups())
    for results in runs.values():
        assert knn_lo <= round(results["knn_top1"], 2) <= knn_hi
        assert lin_lo <= round(results["linear_top1"], 2) <= lin_hi
    assert knn_lo == round(min(r["knn_top1"] for r in runs.values()), 2)
    assert knn_hi == round(max(r["knn_top1"] for r in runs.values()), 2)
    assert lin_lo == round(min(r["linear_top1"] for r in runs.values()), 2)
    assert lin_hi == round(max(r["linear_top1"] for r in runs.values()), 2)
