"""The model card beside the exports (clae_tf/job/model_card.py): its text from a run's flags and
results, against literal expectations, and the card an end-to-end run writes (tests/e2e_test.py
checks it on the run's own files)."""

from clae_tf.job import model_card

FLAGS = {"method": "simclr", "adversarial": "True", "dataset": "/data/my_cifar10",
         "arch": "resnet18", "width": "0.25", "epochs": "15", "batch_size": "256", "seed": "0",
         "attack": "fgsm", "eps": "0.03", "normalize": "half", "alpha": "1.0", "image_size": "32"}
RESULTS = {"step": 285, "knn_top1": 0.3481, "linear_top1": 0.3997, "test_examples": 10000,
           "robust_examples": 1000, "robust_clean_top1": 0.412,
           "robust_attacks": ["pgd20", "apgd-ce", "apgd-t", "square"],
           "robust_top1": {"worst": {"1": 0.337, "8": 0.054}, "pgd20": {"1": 0.35, "8": 0.074}},
           "robust_top1_l2": {"worst": {"0.5": 0.201}},
           "eval_flags": {"knn_k": "200", "robust_apgd_steps": "100", "robust_targets": "3",
                          "robust_square_queries": "1000"}}
EXPORTS = ["saved_model", "encoder.keras", "probe_saved_model"]


def test_card_starts_with_the_metadata_block_model_hubs_read():
    text = model_card.card(FLAGS, RESULTS, 285, EXPORTS)
    assert text.split("\n---\n", 1)[0] == "\n".join([
        "---", "library_name: keras", "pipeline_tag: image-feature-extraction", "tags:",
        "- self-supervised-learning", "- contrastive-learning", "- simclr",
        "- adversarial-training", "- clae", "datasets:", "- my_cifar10"])
    assert "\n# SimCLR + CLAE encoder (resnet18, width 0.25)\n" in text


def test_card_results_are_the_results_files_numbers_with_the_suites_budget():
    lines = model_card.card(FLAGS, RESULTS, 285, EXPORTS).splitlines()
    assert [line for line in lines if line.startswith("| ")] == [
        "| measure | top-1 (%) |",
        "| weighted kNN (k=200), 10000 test images | 34.81 |",
        "| linear probe, 10000 test images | 39.97 |",
        "| robust, L-inf eps 1/255, worst case | 33.7 |",
        "| robust, L-inf eps 8/255, worst case | 5.4 |",
        "| robust, L2 eps 0.5, worst case | 20.1 |"]
    assert ("Robust rows: encoder + probe, 1000 class-balanced test images (clean 41.2 %), worst "
            "case over the attacks pgd20, apgd-ce, apgd-t, square (APGD 100 steps, APGD-T 3 "
            "targets, Square 1000 queries).") in lines


def test_card_names_the_suite_of_the_results_when_they_say_it():
    """results.json's robust_suite (robust.Suite.describe) replaces the budget flags, whose 0
    means "the suite's" since the standard AutoAttack suite."""
    suite = ("pgd20,autoattack (standard AutoAttack + pgd20): pgd20 (20 steps), apgd-ce (100 "
             "steps), apgd-t (9 targets x 100 steps), fab-t (9 targets x 100 steps), square "
             "(5000 queries; L-inf only)")
    results = dict(RESULTS, robust_suite=suite, eval_flags={"robust_targets": "0"})
    lines = model_card.card(FLAGS, results, 285, EXPORTS).splitlines()
    assert ("Robust rows: encoder + probe, 1000 class-balanced test images (clean 41.2 %), worst "
            f"case over {suite}.") in lines


def test_card_lists_how_to_load_each_export_written_and_no_other():
    text = model_card.card(FLAGS, RESULTS, 285, ["saved_model", "encoder.keras"])
    files = [line.split("`")[1] for line in text.splitlines() if line.startswith("- `")]
    assert files == ["saved_model", "encoder.keras"]
    assert "`keras.models.load_model(path)` takes float32 images (N, 32, 32, 3)" in text


def test_card_says_when_the_results_are_of_another_step():
    text = model_card.card(FLAGS, RESULTS, 300, EXPORTS)
    assert "These numbers are of step 285, not of the exported step 300." in text
    assert "not of the exported step" not in model_card.card(FLAGS, RESULTS, 285, EXPORTS)


def test_card_without_results_or_clae():
    flags = dict(FLAGS, adversarial="False", method="uel")
    text = model_card.card(flags, {}, 7, EXPORTS)
    assert "\n# UEL encoder (resnet18, width 0.25)\n" in text
    assert "- clae\n" not in text and "adversarial view" not in text
    assert "Not evaluated (no results.json)." in text
