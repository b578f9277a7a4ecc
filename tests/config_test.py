"""config.py: the flag table, method defaults, enum checks and the flagfile round trip."""

import dataclasses

import pytest
import tensorflow as tf
from absl import flags

from clae_tf import ClaeError
from clae_tf.data import augment
from clae_tf.runtime import config
from clae_tf.runtime.config import Config

from conftest import one_line_error, parse_flags, run_cli

_flags = parse_flags


def test_auto_flags_take_the_methods_values_and_the_others_their_defaults():
    """An auto flag left at its default stands for the method's value (its row in
    METHOD_DEFAULTS): every name in a row is a flag marked auto, and `--method=<m>` alone gives
    each flag the row's value, or its own default where the row has none."""
    config.define_flags()
    fields = {f.name: f for f in dataclasses.fields(config.Config)}
    auto = {name for name, f in fields.items() if f.metadata["auto"]}
    assert set(config.METHOD_DEFAULTS) == set(config.METHODS)
    for method, row in config.METHOD_DEFAULTS.items():
        assert all(name in flags.FLAGS and name in auto for name in row), method
        # The step schedule's boundaries and factors are in a row only with a step schedule.
        step = {"lr_boundaries", "lr_factors"} if row["lr_schedule"] == "step" else set()
        assert set(row) == auto - {"lr_boundaries", "lr_factors"} | step, method
        cfg = _flags(f"--method={method}")
        for name, f in fields.items():
            if name != "method":
                assert getattr(cfg, name) == row.get(name, f.default), (method, name)


def test_every_flag_has_help_and_enum_defaults_are_choices():
    for f in dataclasses.fields(config.Config):
        assert f.metadata["help"], f.name
        if f.metadata["choices"]:
            assert f.default in f.metadata["choices"], f.name


def test_help_is_the_text_written_here():
    # What `python run.py --helpfull` shows, spelled out by hand: a plain flag and an auto one.
    config.define_flags()
    assert flags.FLAGS["alpha"].help == (
        "Weight of the adversarial loss: L = L_clean + alpha * L_adv.")
    assert flags.FLAGS["proj_dim"].help == (
        "Projection (z) dimension. 0: the method's (simclr 64, plain 128, uel 128, moco 128).")


def test_flags_give_the_config_of_the_same_arguments():
    # Every flag's default is its field's (auto ones stay auto until the method is known), and
    # values parse to the field's type.
    assert _flags() == config.Config()
    assert _flags("--method=plain") == config.Config(method="plain")
    cfg = _flags("--alpha=2", "--epochs=3", "--lr_boundaries=5,7", "--lr_factors=0.5,0.1",
                 "--noadversarial", "--head=linear", "--data_dir=/d")
    assert cfg == config.Config(alpha=2.0, epochs=3, lr_boundaries=(5, 7), lr_factors=(0.5, 0.1),
                                adversarial=False, head="linear", data_dir="/d")
    assert [type(v) for v in (cfg.alpha, cfg.epochs, cfg.lr_boundaries[0], cfg.lr_factors[0])] \
        == [float, int, int, float]


def test_auto_help_names_each_methods_value():
    config.define_flags()
    text = flags.FLAGS["temperature"].help
    assert "simclr 0.5" in text and "plain 0.1" in text and "moco 0.2" in text


def test_imagenet_normalisation_is_a_choice():
    assert _flags("--normalize=imagenet").normalize == "imagenet"
    assert config.Config(method="plain", normalize="imagenet").normalize == "imagenet"


@pytest.mark.parametrize("field, value", [("head", "nope"), ("normalize", "imagnet"),
                                          ("method", "simclrr"), ("arch", "resnet99")])
def test_bad_enum_in_config_names_the_flag(field, value):
    with pytest.raises(ClaeError, match=f"^--{field}: .*{value}"):
        config.Config(**{field: value})


def test_step_boundaries_and_factors_come_as_a_pair():
    assert config.Config(method="uel").lr_boundaries == (120, 160, 200)
    # Another schedule: no boundaries.
    cosine = config.Config(method="uel", lr_schedule="cosine")
    assert (cosine.lr_boundaries, cosine.lr_factors) == ((), ())
    # Both given: kept.
    own = config.Config(method="uel", lr_boundaries=(10,), lr_factors=(0.5,))
    assert (own.lr_boundaries, own.lr_factors) == ((10,), (0.5,))
    # Half of the pair is an error, not silently replaced by the method's pair.
    with pytest.raises(ClaeError, match="^--lr_factors:"):
        config.Config(method="uel", lr_factors=(0.5,))
    with pytest.raises(ClaeError, match="^--lr_factors:"):
        config.Config(method="plain", lr_boundaries=(10, 20))


def test_explicit_flag_beats_the_method_default():
    cfg = _flags("--method=moco", "--temperature=0.07", "--weight_decay=0", "--head=linear")
    assert (cfg.temperature, cfg.weight_decay, cfg.head) == (0.07, 0.0, "linear")
    assert cfg.learning_rate == 0.06  # the rest is still MoCo's


def test_flagfile_round_trip(tmp_path):
    cfg = config.Config(method="plain", adversarial=True, data_dir=None, width=0.5,
                        knn_sigma=0.2, mode="eval", virtual_cpus=2)
    text = cfg.to_flagfile()
    assert "--mode" not in text and "--virtual_cpus" not in text and "--data_dir" not in text
    assert "--lr_boundaries=120,160,200\n" in text and "--adversarial\n" in text
    assert "--nosync_bn" not in text and "--sync_bn\n" in text
    path = tmp_path / "flags.cfg"
    path.write_text(text)
    again = _flags(f"--flagfile={path}", "--mode=eval", "--virtual_cpus=2")
    assert again == cfg
    parsed = config.Config.parse_flagfile(text.replace("--adversarial", "--noadversarial"))
    assert parsed["adversarial"] == "False" and parsed["lr_factors"] == "0.1,0.05,0.01"
    assert parsed["width"] == "0.5" and parsed["sync_bn"] == "True"


# ---------------------------------------------------------------------------------------------
# Nonsensical numeric values: one line naming the flag, before TensorFlow is imported.


BAD_VALUES = [
    ("ckpt_every", 0), ("log_every", 0), ("image_every", 0), ("eval_batch_size", 0),
    ("linear_batch_size", -1), ("proj_hidden", -5), ("max_steps", -1), ("train_examples", -1),
    ("examples_per_class", -1), ("eps", 100.0), ("eps", 2.5), ("temperature", 1e-45),
    ("temperature", 5e-4), ("knn_sigma", 1e-45), ("knn_sigma", -1.0), ("linear_epochs", -1),
    ("linear_epochs", 0), ("linear_lr", 0.0), ("momentum", 1.0), ("momentum", -0.1),
    ("seed", -1), ("seed", 2 ** 32), ("virtual_cpus", -1), ("eps", float("nan")),
    ("alpha", float("inf")), ("learning_rate", float("nan")), ("width", float("inf")),
    ("weight_decay", float("nan")),
]


@pytest.mark.parametrize("flag, value", BAD_VALUES)
def test_bad_value_is_refused(flag, value):
    with pytest.raises(ClaeError) as e:
        Config(**{flag: value})
    assert str(e.value).startswith(f"--{flag}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("kw, flag", [
    (dict(lr_schedule="step", lr_boundaries=(160, 120), lr_factors=(0.1, 0.01)), "lr_boundaries"),
    (dict(lr_schedule="step", lr_boundaries=(-1,), lr_factors=(0.1,)), "lr_boundaries"),
    (dict(lr_schedule="step", lr_boundaries=(10, 10), lr_factors=(0.1, 0.1)), "lr_boundaries"),
    (dict(lr_schedule="step", lr_boundaries=(10,), lr_factors=(-0.1,)), "lr_factors"),
    (dict(lr_schedule="step", lr_boundaries=(10,), lr_factors=(float("nan"),)), "lr_factors"),
])
def test_bad_step_schedule_is_refused(kw, flag):
    with pytest.raises(ClaeError, match=f"^--{flag}: "):
        Config(**kw)


@pytest.mark.parametrize("kw", [
    dict(), dict(eps=2.0), dict(eps=0.0), dict(normalize="cifar", eps=4.9), dict(temperature=1e-3),
    dict(knn_sigma=1e-3), dict(max_steps=0), dict(proj_hidden=0), dict(momentum=0.0),
    dict(seed=2 ** 32 - 1), dict(train_examples=0), dict(linear_epochs=1),
    dict(lr_schedule="step", lr_boundaries=(0, 5), lr_factors=(0.5, 0.1)),
])
def test_sensible_values_pass(kw):
    Config(**kw)


def test_eps_bound_is_the_input_range_of_the_normalisation():
    """The bound on --eps is the span of [0, 1] after the normalisation augment applies."""
    for kind, (_, std) in augment.NORMALIZATIONS.items():
        # The smallest range a pixel's [0, 1] spans over the channels: 1 / the largest std.
        span = float(tf.reduce_min(augment.normalize(tf.ones([3]), kind)
                                   - augment.normalize(tf.zeros([3]), kind)))
        assert span == pytest.approx(1 / max(std))
        Config(normalize=kind, eps=span * 0.999)
        with pytest.raises(ClaeError, match=f"^--eps: .*{span:.3g} with --normalize={kind}"):
            Config(normalize=kind, eps=span * 1.001)


def test_eps_message_explains_the_units():
    with pytest.raises(ClaeError) as e:
        Config(eps=100)
    assert str(e.value) == ("--eps: 100 is larger than the whole input range (2 with "
                            "--normalize=half); eps is in normalised-input units (0.03 ~ 3.8/255 "
                            "of a pixel's range)")


@pytest.mark.parametrize("args, flag", [
    (["--ckpt_every=0"], "--ckpt_every"),
    (["--image_every=0"], "--image_every"),
    (["--eval_batch_size=0"], "--eval_batch_size"),
    (["--max_steps=-1"], "--max_steps"),
    (["--train_examples=-1"], "--train_examples"),
    (["--eps=100"], "--eps"),
    (["--temperature=1e-45"], "--temperature"),
    (["--eps=nan"], "--eps"),
    (["--strategy=one_device", "--virtual_cpus=2"], "--virtual_cpus"),
    (["--robust_eps=8,x"], "--robust_eps"),
    (["--eps=-1"], "--eps"),
    (["--alpha=-1"], "--alpha"),
    (["--batch_size=1"], "--batch_size"),
    (["--robust_eps=1,-2"], "--robust_eps"),
    (["--robust_examples=-1"], "--robust_examples"),
    (["--robust_attacks=pgd20,autoatack"], "--robust_attacks"),
    (["--robust_l2_eps=0.5,-1"], "--robust_l2_eps"),
    (["--attack=nope"], "--attack"),
    (["--attack_steps=0"], "--attack_steps"),
    (["--attack_step_size=-0.01"], "--attack_step_size"),
    (["--robust_attacks=,,"], "--robust_attacks"),
    # smoke.cfg's --robust_apgd_steps=5 (its first budget flag) and the standard suite's 100
    (["--robust_attacks=pgd20,autoattack"], "--robust_apgd_steps"),
])
def test_bad_values_fail_before_tensorflow(tmp_path, args, flag):
    proc = run_cli(["--flagfile=flags/smoke.cfg", "--epochs=1", "--linear_epochs=2",
                    f"--workdir={tmp_path / 'run'}"] + args, tmp_path, tensorflow=False)
    one_line_error(proc, flag)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The robust evaluation's flags: radii parsed once (config.parse_radii), attacks by name.


@pytest.mark.parametrize("flags, flag, words", [
    (dict(robust_attacks="pgd20,apgd"), "robust_attacks", "'apgd'"),
    (dict(robust_attacks="autoatack"), "robust_attacks", "did you mean autoattack"),
    (dict(robust_square_queries=-1), "robust_square_queries", ">= 1, or 0 for the suite's"),
    (dict(robust_apgd_steps=-1), "robust_apgd_steps", ">= 1, or 0 for the suite's"),
    (dict(robust_targets=-1), "robust_targets", ">= 1, or 0 for the suite's"),
    (dict(robust_square_queries=10 ** 9), "robust_square_queries",
     "1000000000 is more than 100,000 queries per image"),
    (dict(robust_attacks=",,"), "robust_attacks", "empty item in ',,'"),
    (dict(robust_attacks="pgd20,,fgsm"), "robust_attacks", "empty item in 'pgd20,,fgsm'"),
    (dict(robust_attacks="autoattack,"), "robust_attacks", "a comma too many?"),
])  # the radii: below, message by message
def test_bad_robust_flags_name_the_flag(flags, flag, words):
    with pytest.raises(ClaeError) as e:
        Config(**flags)
    assert str(e.value).startswith(f"--{flag}: ") and words in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (dict(robust_eps="1,x"),
     "--robust_eps: expected comma-separated numbers (in 1/255), got '1,x'"),
    (dict(robust_eps="nan"), "--robust_eps: must be >= 0 (in 1/255), got nan"),
    (dict(robust_eps="8,300"), "--robust_eps: 300 is more than the whole [0, 1] pixel range "
                               "(255/255); the radii are in 1/255"),
    (dict(robust_l2_eps="0.5,-0.25"), "--robust_l2_eps: must be >= 0, got -0.25"),
    (dict(robust_l2_eps="a"), "--robust_l2_eps: expected comma-separated numbers, got 'a'"),
    (dict(robust_eps="1,,2"), "--robust_eps: empty item in '1,,2' (a comma too many?); an "
                              "entirely empty value means none"),
    (dict(robust_l2_eps=" ,"), "--robust_l2_eps: empty item in ' ,' (a comma too many?); an "
                               "entirely empty value means none"),
])
def test_a_bad_radius_is_refused_once_with_its_message(monkeypatch, flags, message):
    calls = []
    parse = config.parse_radii
    monkeypatch.setattr(config, "parse_radii", lambda *a: calls.append(a) or parse(*a))
    with pytest.raises(ClaeError) as e:
        Config(**flags)
    assert str(e.value) == message
    bad = next(iter(flags))
    assert [name for name, _ in calls].count(bad) == 1  # refused on its first parse


def test_an_entirely_empty_list_means_none():
    cfg = Config(robust_attacks=" ", robust_eps="", robust_l2_eps="  ")
    assert cfg.robust_attack_list == () and cfg.robust_eps_list == () == cfg.robust_l2_eps_list


def test_square_budget_is_bounded_with_the_reason():
    assert Config(robust_square_queries=config.MAX_SQUARE_QUERIES).robust_square_queries == 100_000
    with pytest.raises(ClaeError) as e:
        Config(robust_square_queries=config.MAX_SQUARE_QUERIES + 1)
    assert str(e.value) == ("--robust_square_queries: 100001 is more than 100,000 queries per "
                            "image, which takes days on 1,000 images; AutoAttack's standard "
                            "budget is 5,000")


# The suites: autoattack is standard AutoAttack at its fixed budget (AutoAttack's
# version='standard': 100 iterations, 9 targets, 5,000 queries), fast its attacks minus FAB-T at
# the budget flags', whose 0 means the suite's.
STANDARD = dict(robust_apgd_steps=100, robust_targets=9, robust_square_queries=5000)
SMALLER = dict(robust_apgd_steps=100, robust_targets=3, robust_square_queries=1000)


@pytest.mark.parametrize("attacks, flags, budgets", [
    ("pgd20,autoattack", {}, STANDARD),
    ("AutoAttack,apgd-dlr", dict(STANDARD), STANDARD),  # the standard values, given: accepted
    ("pgd20,fast", {}, SMALLER),
    ("quick", {}, SMALLER),
    ("apgd-ce,apgd-t,fab-t,square", {}, SMALLER),
    ("pgd20,fast", dict(robust_apgd_steps=5, robust_targets=2, robust_square_queries=20),
     dict(robust_apgd_steps=5, robust_targets=2, robust_square_queries=20)),
    ("fast", dict(robust_targets=9), dict(SMALLER, robust_targets=9)),
])
def test_budget_flags_at_zero_are_the_suites(attacks, flags, budgets):
    cfg = Config(robust_attacks=attacks, **flags)
    assert cfg.robust_budgets == budgets
    assert {name: getattr(cfg, name) for name in budgets} == {**dict.fromkeys(budgets, 0),
                                                               **flags}  # the flags as given


@pytest.mark.parametrize("flag, value", [("robust_targets", 3), ("robust_square_queries", 1000),
                                         ("robust_apgd_steps", 50)])
def test_autoattack_refuses_another_budget_in_one_line(flag, value):
    with pytest.raises(ClaeError) as e:
        Config(robust_attacks="pgd20,autoattack", **{flag: value})
    assert str(e.value) == (
        f"--{flag}: {value}, but autoattack is standard AutoAttack, whose budget is fixed "
        f"({STANDARD[flag]}; leave the flag at 0); for another budget use the suite fast "
        f"(apgd-ce,apgd-t,square at the budget flags'), which is what autoattack ran before it "
        f"had FAB-T (an older flags.cfg's --robust_attacks=...,autoattack)")


def test_autoattack_and_fast_are_not_both_named():
    with pytest.raises(ClaeError) as e:
        Config(robust_attacks="fast,pgd20,autoattack")
    assert str(e.value) == ("--robust_attacks: autoattack and fast are the same attacks at two "
                            "budgets (standard AutoAttack's and the budget flags'): name one")


def test_suites_expand_to_autoattacks_standard_composition_and_the_fast_one():
    assert config.ROBUST_SUITES == {"autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"),
                                    "fast": ("apgd-ce", "apgd-t", "square"),
                                    "quick": ("pgd20", "fgsm")}
    assert Config(robust_attacks="pgd20,autoattack").robust_attack_list == (
        "pgd20", "apgd-ce", "apgd-t", "fab-t", "square")
    assert Config(robust_attacks="fast").robust_attack_list == ("apgd-ce", "apgd-t", "square")


def test_radii_are_parsed_once_into_numbers(monkeypatch):
    calls = []
    parse = config.parse_radii
    monkeypatch.setattr(config, "parse_radii", lambda *a: calls.append(a) or parse(*a))
    cfg = Config(robust_eps=" 1, 2,4 ,0.5", robust_l2_eps="")
    assert sorted(calls) == [("robust_eps", " 1, 2,4 ,0.5"), ("robust_l2_eps", "")]
    assert cfg.robust_eps_list == (1.0, 2.0, 4.0, 0.5) and cfg.robust_l2_eps_list == ()
    assert Config().robust_l2_eps_list == (0.25, 0.5)  # the flag's default, "0.25,0.5"
    calls.clear()
    assert cfg.robust_eps_list == (1.0, 2.0, 4.0, 0.5) and not calls  # kept, not parsed again
    # The parsed radii are not flags: a flagfile and Config's equality know only the strings.
    assert "robust_eps_list" not in cfg.to_flagfile()
    assert cfg == Config(robust_eps=" 1, 2,4 ,0.5", robust_l2_eps="")


# ---------------------------------------------------------------------------------------------
# Flags that only make sense together: refused by Config, before TensorFlow starts.


@pytest.mark.parametrize("strategy, message", [
    ("multiworker", "--virtual_cpus: not with --strategy=multiworker (each worker process uses "
                    "its GPUs, or one CPU device)"),
    ("one_device", "--virtual_cpus: needs --strategy=auto or mirrored, not one_device"),
])
def test_virtual_cpus_need_a_mirrored_strategy(strategy, message):
    with pytest.raises(ClaeError) as e:
        Config(strategy=strategy, virtual_cpus=2)
    assert str(e.value) == message
    Config(strategy=strategy, virtual_cpus=1)  # one CPU device: nothing to mirror over
    Config(strategy=strategy)


@pytest.mark.parametrize("strategy", ["auto", "mirrored"])
def test_virtual_cpus_with_a_mirrored_strategy_pass(strategy):
    assert Config(strategy=strategy, virtual_cpus=4).virtual_cpus == 4
