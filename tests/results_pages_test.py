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


# -- the trade-off page (scripts/tradeoff_report.py) on small synthetic runs ----------------------

tradeoff = results_pages.tradeoff_report


def _run(name, method, adversarial, eps, epochs, seed, linear, knn, worst=None, **results):
    """A kept run as compare.load_run gives it: accuracies as fractions, worst {radius: acc}."""
    flags = {"method": method, "seed": str(seed), "epochs": str(epochs), "eps": str(eps),
             "robust_targets": "3", "robust_square_queries": "1000"}
    if adversarial:
        flags["adversarial"] = "True"
    out = {"knn_top1": knn, "linear_top1": linear, **results}
    if worst is not None:
        out.update(robust_top1={"worst": worst}, robust_examples=1000,
                   robust_attacks=["pgd20", "apgd-ce", "apgd-t", "square"])
    label = {"simclr": "SimCLR", "plain": "Plain", "uel": "UEL", "moco": "MoCo"}[method]
    return {"workdir": f"/kept/{name}", "label": label + ("+CLAE" if adversarial else ""),
            "flags": flags, "results": out, "sweep": {}}


# All of CIFAR-10, 10 epochs: SimCLR and SimCLR + CLAE at eps 0.03, seeds 0-2; linear, kNN and
# the worst case at 2/255 and 8/255.
SIMCLR10 = {0: (0.550, 0.476, 0.050, 0.000), 1: (0.555, 0.480, 0.070, 0.001),
            2: (0.548, 0.472, 0.040, 0.000)}
CLAE10 = {0: (0.515, 0.465, 0.330, 0.030), 1: (0.529, 0.481, 0.341, 0.031),
          2: (0.523, 0.466, 0.313, 0.021)}
SIMCLR30 = {0: (0.610, 0.540, 0.041, 0.000), 1: (0.622, 0.551, 0.052, 0.000)}
CLAE30 = {0: (0.580, 0.521, 0.352, 0.041), 1: (0.583, 0.530, 0.371, 0.046)}
EPS0588 = (0.490, 0.430, 0.370, 0.060)


def _runs(prefix, method, adversarial, eps, epochs, table):
    return [_run(f"{prefix}_seed{s}", method, adversarial, eps, epochs, s, lin, knn,
                 {"1": w2 + 0.1, "2": w2, "4": w2 / 2, "8": w8})
            for s, (lin, knn, w2, w8) in table.items()]


def _pages(schedule=True, eps=True):
    pages = {"cifar10_full": {"SimCLR": _runs("simclr", "simclr", False, 0.03, 10, SIMCLR10),
                              "SimCLR+CLAE": _runs("clae", "simclr", True, 0.03, 10, CLAE10)}}
    if eps:
        lin, knn, w2, w8 = EPS0588
        pages["tradeoff_eps"] = {"SimCLR+CLAE eps 0.0588": [_run(
            "clae_eps0588_seed0", "simclr", True, 0.0588, 10, 0, lin, knn,
            {"1": w2, "2": w2, "4": w2, "8": w8})]}
    if schedule:
        pages["tradeoff_schedule"] = {
            "SimCLR": _runs("simclr", "simclr", False, 0.03, 30, SIMCLR30),
            "SimCLR+CLAE": _runs("clae", "simclr", True, 0.03, 30, CLAE30)}
    return pages


def _points(table, i, seeds=(0, 1, 2)):
    return np.array([100 * table[s][i] for s in seeds])


def _question(key):
    return next(q for q in tradeoff.QUESTIONS if q.key == key)


def _comparison(key, subject):
    return next(c for c in _question(key).comparisons if c.subject == subject)


def test_paired_differences_are_the_seed_by_seed_differences():
    cells = tradeoff.collect(_pages())
    c = _comparison("schedule", "CLAE - SimCLR at 10 epochs")
    for i, metric in enumerate(("linear", "kNN", "worst 2/255", "worst 8/255")):
        diffs = tradeoff.paired(cells, c, metric)
        assert list(diffs) == ["0", "1", "2"]
        np.testing.assert_allclose(list(diffs.values()),
                                   _points(CLAE10, i) - _points(SIMCLR10, i), atol=1e-9)
    # The change of CLAE's effect from 10 to 30 epochs: over the seeds all four groups have.
    c = _comparison("schedule", "(CLAE - SimCLR at 30 epochs) - (CLAE - SimCLR at 10 epochs)")
    diffs = tradeoff.paired(cells, c, "linear")
    expected = ((_points(CLAE30, 0, (0, 1)) - _points(SIMCLR30, 0, (0, 1)))
                - (_points(CLAE10, 0, (0, 1)) - _points(SIMCLR10, 0, (0, 1))))
    assert list(diffs) == ["0", "1"]
    np.testing.assert_allclose(list(diffs.values()), expected, atol=1e-9)


def test_the_verdict_rule():
    # Mean beyond one std: costs / gains |mean| ± std.
    d = np.array([-3.5, -1.4, -2.5])
    assert tradeoff.verdict(list(d)) == (
        f"costs {abs(d.mean()):.2f} ± {d.std(ddof=1):.2f} points (3 seeds)")
    assert tradeoff.verdict([3.5, 1.4, 2.5]).startswith(f"gains {d.mean() * -1:.2f} ± ")
    # Within one std: no effect measured.
    d = np.array([1.5, -1.0, 0.4])
    assert abs(d.mean()) <= d.std(ddof=1)
    assert tradeoff.verdict(list(d)) == (
        f"no effect measured ({d.mean():+.2f} ± {d.std(ddof=1):.2f}, 3 seeds)")
    # One seed: judged against a reference std when given, else not judged.
    assert tradeoff.verdict([-2.0], ref_std=0.7) == (
        "costs 2.00 ± 0.70 points (one seed against the reference std)")
    assert tradeoff.verdict([0.5], ref_std=0.7) == (
        "no effect measured (+0.50 ± 0.70, one seed against the reference std)")
    assert tradeoff.verdict([-2.0]) == "-2.00 on one seed (no spread: not judged)"
    assert tradeoff.verdict([]) == "not measured"


def test_the_trade_off_page_states_the_verdicts_of_its_numbers(tmp_path):
    text = tradeoff.page(_pages(), str(tmp_path), "<!-- generated -->")
    lin = _points(CLAE10, 0) - _points(SIMCLR10, 0)
    w2 = _points(CLAE10, 2) - _points(SIMCLR10, 2)
    assert (f"| CLAE - SimCLR at 10 epochs | 0,1,2 | {lin.mean():+.2f} ± {lin.std(ddof=1):.2f} "
            in text)
    assert (f"- CLAE - SimCLR at 10 epochs: linear costs {-lin.mean():.2f} ± "
            f"{lin.std(ddof=1):.2f} points (3 seeds);" in text)
    assert f"worst 2/255 gains {w2.mean():.2f} ± {w2.std(ddof=1):.2f} points (3 seeds)" in text
    # eps 0.0588 has seed 0 alone: judged against the std of the eps 0.03 differences.
    d = 100 * (EPS0588[0] - SIMCLR10[0][0])
    assert (f"- SimCLR+CLAE eps 0.0588 (7.5/255) - SimCLR: linear costs {-d:.2f} ± "
            f"{lin.std(ddof=1):.2f} points (one seed against the reference std)" in text)
    # The group means, with the seeds kept of those expected.
    means = _points(SIMCLR30, 0, (0, 1))
    assert (f"| SimCLR, 30 epochs | [tradeoff_schedule](../tradeoff_schedule/README.md) | 0,1 "
            f"(2 of 2) | {means.mean():.2f} ± {means.std(ddof=1):.2f} |" in text)
    # What is missing is named, never an error.
    assert ("- SimCLR+CLAE eps 0.0078 (1.0/255) - SimCLR: not run yet (3 of 4 runs kept; "
            "missing: SimCLR+CLAE eps 0.0078 (1.0/255) seed 0)." in text)
    assert "| MoCo | - | not run yet (0 of 3) |" in text
    assert "The eps series (2 of 5 eps kept, group means): worst 2/255 is highest at eps 0.0588" \
        in text
    assert ("Robust suite: pgd20 + apgd-ce, apgd-t (3 targets), square (1,000 queries) on 1,000 "
            "test images (all 10 runs)." in text)
    assert "not run yet (0 of 4 runs kept)" not in text


def test_the_trade_off_page_with_partial_and_no_data(tmp_path):
    text = tradeoff.page(_pages(schedule=False, eps=False), str(tmp_path), "")
    assert ("- CLAE - SimCLR at 30 epochs: not run yet (0 of 4 runs kept; missing: SimCLR+CLAE "
            "eps 0.03 (3.8/255), 30 epochs seeds 0,1; SimCLR, 30 epochs seeds 0,1).") in text
    assert "The online kNN curves of the 30-epoch pairs: not run yet (0 of 4 runs kept)." in text
    assert "The eps series: 1 of 5 eps kept" in text
    empty = tradeoff.page({}, str(tmp_path), "")
    assert "Runs kept: 0 of the 38 the questions use." in empty
    assert empty.count("not run yet") >= 14
    # The figure draws what there is (and nothing without runs).
    assert tradeoff.plot_tradeoff(_pages(schedule=False), str(tmp_path / "t.png"))
    assert os.path.getsize(tmp_path / "t.png") > 0
    assert not tradeoff.plot_tradeoff({}, str(tmp_path / "none.png"))
    assert not tradeoff.plot_online(str(tmp_path), str(tmp_path / "o.png"))


def test_the_online_knn_table_of_the_30_epoch_pairs(tmp_path):
    curves = {"SimCLR": {"simclr_seed0": [[5.0, 0.40], [10.0, 0.45]],
                         "simclr_seed1": [[5.0, 0.42], [10.0, 0.48]]},
              "SimCLR+CLAE": {"clae_seed0": [[5.0, 0.39], [10.0, 0.46]],
                              "clae_seed1": [[5.0, 0.40], [10.0, 0.44]]}}
    (tmp_path / "tradeoff_schedule").mkdir()
    with open(tmp_path / "tradeoff_schedule" / "online_knn.json", "w") as f:
        json.dump(curves, f)
    text = tradeoff.page(_pages(), str(tmp_path), "")
    d = 100 * (np.array([0.46, 0.44]) - np.array([0.45, 0.48]))
    assert (f"| 10 | 46.50 ± 2.12 | 45.00 ± 1.41 | {d.mean():+.2f} ± {d.std(ddof=1):.2f} |"
            in text)
    assert tradeoff.plot_online(str(tmp_path), str(tmp_path / "o.png"))


def test_which_robust_suite_made_the_numbers():
    run = _run("a", "simclr", True, 0.03, 10, 0, 0.5, 0.5, {"2": 0.3})
    assert tradeoff.suite_description(run) == (
        "pgd20 + apgd-ce, apgd-t (3 targets), square (1,000 queries)")
    # What ran over the flags: apgd-t's targets as used, the evaluation's flags over flags.cfg.
    run["results"].update(robust_targets_used=2, eval_flags={"robust_square_queries": "5000"})
    assert tradeoff.suite_description(run) == (
        "pgd20 + apgd-ce, apgd-t (2 targets), square (5,000 queries)")
    # Without the kept list: the flag, its suites expanded.
    del run["results"]["robust_attacks"]
    run["flags"]["robust_attacks"] = "quick"
    assert tradeoff.suite_description(run) == "pgd20, fgsm"
    # results.json's robust_suite names it when present.
    named = _run("b", "simclr", True, 0.03, 10, 1, 0.5, 0.5, {"2": 0.3},
                 robust_suite="autoattack-standard")
    assert tradeoff.suite_description(named) == "autoattack-standard"
    line = tradeoff.suite_line([run, named, _run("c", "simclr", False, 0, 10, 0, 0.5, 0.5)])
    assert line.startswith("Robust suites differ")
    assert "pgd20, fgsm on 1,000 test images (a)" in line
    assert "autoattack-standard on 1,000 test images (b)" in line


def test_a_protocol_of_several_eps_gets_a_group_per_eps():
    runs = [_run(f"clae_eps{e}_seed0", "simclr", True, e, 10, 0, 0.5, 0.5) for e in
            (0.0078, 0.1176)] + [_run("plain_seed0", "plain", False, 0.03, 15, 0, 0.4, 0.4)]
    labels = [r["label"] for r in results_pages._split(runs)]
    assert labels == ["SimCLR+CLAE eps 0.0078", "SimCLR+CLAE eps 0.1176", "Plain"]


# -- the fine-tuning page (scripts/finetune_report.py) on small synthetic runs --------------------

finetune = results_pages.finetune_report
CHEAP, AA = "pgd20,fast", "pgd20,autoattack"
# Per (CLAE or not, seed) and protocol: clean top-1, the cheaper suite's worst case at 1, 2, 4 and
# 8/255, AutoAttack's at 8/255, seconds of (fine-)tuning and of the cheaper suite.
FT = {
    (False, 0): {"SLF": (0.612, (0.301, 0.113, 0.012, 0.000), 0.000, 1510.0, 610.0),
                 "ALF": (0.523, (0.452, 0.381, 0.252, 0.071), 0.052, 700.0, 602.0),
                 "AFF": (0.584, (0.531, 0.472, 0.353, 0.142), 0.121, 820.0, 590.0)},
    (False, 1): {"SLF": (0.618, (0.292, 0.104, 0.021, 0.001), 0.001, 1490.0, 630.0),
                 "ALF": (0.531, (0.443, 0.392, 0.243, 0.083), 0.061, 720.0, 611.0),
                 "AFF": (0.571, (0.524, 0.461, 0.364, 0.153), 0.132, 800.0, 580.0)},
    (True, 0): {"SLF": (0.581, (0.512, 0.403, 0.101, 0.012), 0.004, 2310.0, 650.0),
                "ALF": (0.504, (0.483, 0.421, 0.312, 0.121), 0.093, 710.0, 620.0),
                "AFF": (0.566, (0.543, 0.491, 0.382, 0.171), 0.144, 830.0, 600.0)},
    (True, 1): {"SLF": (0.592, (0.523, 0.384, 0.113, 0.021), 0.011, 2290.0, 660.0),
                "ALF": (0.512, (0.471, 0.433, 0.321, 0.112), 0.102, 690.0, 640.0),
                "AFF": (0.553, (0.551, 0.482, 0.371, 0.183), 0.151, 850.0, 610.0)},
}


def _entry(suite, clean_key, clean, worst, train, evaluation):
    """An SLF (clean_key linear_top1: results.json's top level) or ALF/AFF entry."""
    return {clean_key: clean, "test_examples": 10000, "robust_top1": {"worst": worst},
            "robust_examples": 1000, "robust_suite": f"{suite} (the suite)",
            "eval_flags": {"robust_attacks": suite}, "train_seconds_this_process": train,
            "robust_seconds": evaluation}


def _ft_runs(adversarial, seed, protocols=("SLF", "ALF", "AFF"), copy=True,
             aa=("SLF", "ALF", "AFF")):
    """A pretraining run with the `protocols` it has, and (copy) its _aa8 copy, re-evaluated by
    AutoAttack for the protocols in `aa` (the others still the run's numbers)."""
    name = f"{'clae' if adversarial else 'simclr'}_seed{seed}"
    table = FT[(adversarial, seed)]
    run = _run(name, "simclr", adversarial, 0.03, 15, seed, table["SLF"][0], 0.4)
    for p in protocols:
        clean, worst, _, train, evaluation = table[p]
        e = _entry(CHEAP, "linear_top1" if p == "SLF" else "top1", clean,
                   dict(zip(("1", "2", "4", "8"), worst)), train, evaluation)
        if p == "SLF":
            run["results"].update(e)
        else:
            run["results"][p.lower()] = e
    if not copy:
        return [run]
    results = json.loads(json.dumps(run["results"]))
    # The copy's own numbers, other than AutoAttack's, must never reach the table.
    results.update(linear_top1=0.999, train_seconds_this_process=1.0, robust_seconds=9999.0)
    for p in aa:
        e = results if p == "SLF" else results.get(p.lower())
        if e is not None:
            e.update(eval_flags={"robust_attacks": AA}, robust_suite=f"{AA} (standard)",
                     robust_top1={"worst": {"8": table[p][2]}}, robust_seconds=5000.0)
    return [run, dict(run, workdir=run["workdir"] + "_aa8", results=results)]


def _pct(values):
    v = 100 * np.array(values)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def _min(values):
    v = np.array(values) / 60
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def _ft_row(protocol, adversarial, seeds):
    rows = [FT[(adversarial, s)][protocol] for s in seeds]
    cells = [_pct([r[0] for r in rows]), _pct([r[2] for r in rows])]
    cells += [_pct([r[1][i] for r in rows]) for i in range(4)]
    cells += [_min([r[3] for r in rows]), _min([r[4] for r in rows])]
    label = "SimCLR+CLAE" if adversarial else "SimCLR"
    return f"| {protocol} | {label} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |"


def test_the_finetune_page_shows_the_files_numbers_over_two_seeds():
    runs = [r for s in (0, 1) for adv in (False, True) for r in _ft_runs(adv, s)]
    text = finetune.page(runs)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [_ft_row(p, adv, (0, 1)) for p in ("SLF", "ALF", "AFF")
                        for adv in (False, True)]
    assert "Not kept yet" not in text
    # The copies are paired with their runs, never seeds: 4 runs, 4 copies.
    assert "Runs: 4 pretrained encoders and 4 AutoAttack copies of them" in text
    assert "pgd20,autoattack (standard) on 1,000 test images" in text
    assert "the cheaper suite, pgd20,fast (the suite) on 1,000 test images." in text
    # The speed record: the pretraining's train steps against SLF's robust evaluation.
    ratio = np.array([FT[(True, s)]["SLF"][4] / FT[(True, s)]["SLF"][3] for s in (0, 1)])
    assert (f"- SimCLR+CLAE (seeds 0,1): pretraining {_min([2310.0, 2290.0])} min, the cheaper "
            f"suite's evaluation of SLF {_min([650.0, 660.0])} min: evaluation / training = "
            f"{ratio.mean():.2f} ± {ratio.std(ddof=1):.2f}") in text
    # The index's short table: clean, AutoAttack, worst 2/255 and 8/255.
    summary = finetune.summary(runs)
    adv = [FT[(True, s)]["ALF"] for s in (0, 1)]
    assert (f"| ALF | SimCLR+CLAE | 0,1 | {_pct([r[0] for r in adv])} | "
            f"{_pct([r[2] for r in adv])} | {_pct([r[1][1] for r in adv])} | "
            f"{_pct([r[1][3] for r in adv])} |") in summary


def test_the_finetune_page_names_what_is_not_kept_yet():
    # SimCLR: no AFF yet, its copy re-evaluated for SLF and ALF only; SimCLR + CLAE: no copy yet.
    runs = (_ft_runs(False, 0, protocols=("SLF", "ALF"), aa=("SLF", "ALF"))
            + _ft_runs(True, 0, copy=False))
    text = finetune.page(runs)
    assert _ft_row("SLF", False, (0,)) in text
    assert "| AFF | SimCLR | 0 | – | – | – | – | – | – | – | – |" in text
    clae = _ft_row("SLF", True, (0,)).split(" | ")
    assert " | ".join(clae[:4] + ["–"] + clae[5:]) in text
    assert ("Not kept yet (– in the table): simclr_seed0: AFF; simclr_seed0_aa8: AutoAttack of "
            "AFF; clae_seed0_aa8: not made yet (AutoAttack of SLF, ALF, AFF).") in text
    # A copy whose AutoAttack step has not run holds its run's numbers: not AutoAttack's.
    stale = _ft_runs(False, 0, aa=())
    assert "| SLF | SimCLR | 0 | 61.20 | – |" in finetune.page(stale)
    assert "simclr_seed0_aa8: AutoAttack of SLF, ALF, AFF" in finetune.page(stale)
    # One seed of two with a number: over the seed that has it, saying so.
    two = _ft_runs(False, 0) + _ft_runs(False, 1, protocols=("SLF",), copy=False)
    assert "| ALF | SimCLR | 0,1 | 52.30 (1 of 2 seeds) | 5.20 (1 of 2 seeds) |" in (
        finetune.page(two))


def _keep(folder, run):
    """Writes a synthetic run's kept files as scripts/sweep_lib.sh's sweep_keep would."""
    path = os.path.join(folder, os.path.basename(run["workdir"]))
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(run["results"], f)
    flags = ["--method=simclr", f"--seed={run['flags']['seed']}", "--dataset=/data/cifar10",
             "--adversarial" if run["flags"].get("adversarial") else "--noadversarial"]
    with open(os.path.join(path, "flags.cfg"), "w") as f:
        f.write("\n".join(flags) + "\n")
    with open(os.path.join(path, "sweep.jsonl"), "w") as f:
        f.write(json.dumps({"event": "start", "unix": 1, "commit": "0123456789abcdef"}) + "\n")


def test_the_finetune_page_is_generated_once_its_runs_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(results_pages, "RESULTS", str(tmp_path))
    page = os.path.join(str(tmp_path), "finetune_small", "README.md")
    generated = results_pages.generate()
    assert page not in generated and "finetune_small" not in generated[
        os.path.join(str(tmp_path), "README.md")]
    folder = tmp_path / "finetune_small" / "runs"
    for adv in (False, True):
        for run in _ft_runs(adv, 0):
            _keep(str(folder), run)
    generated = results_pages.generate()
    assert results_pages.protocol_groups() == {}  # not a protocol: its copies are no seeds
    text = generated[page]
    assert text.startswith(results_pages.GENERATED)
    assert _ft_row("AFF", True, (0,)) in text
    assert "at commit 0123456; data: the image folder `cifar10/`, the CIFAR-10 JPEG" in text
    assert "/data/cifar10" not in text
    index = generated[os.path.join(str(tmp_path), "README.md")]
    assert f"## [{finetune.TITLE}](finetune_small/README.md)" in index
    assert "| AFF | SimCLR+CLAE | 0 |" in index
