"""config.py: the flag table, method defaults, enum checks and the flagfile round trip."""

import dataclasses

import pytest
from absl import flags

from conftest import parse_flags

from clae_tf import ClaeError, config

AUTO = {"temperature", "head", "proj_dim", "augment", "normalize", "optimizer", "learning_rate",
        "weight_decay", "lr_schedule", "lr_boundaries", "lr_factors", "probe", "linear_batch_size"}


_flags = parse_flags


def test_auto_flags_and_method_rows_agree():
    auto = {f.name for f in dataclasses.fields(config.Config) if f.metadata["auto"]}
    assert auto == AUTO
    assert set(config.METHOD_DEFAULTS) == set(config.METHODS)
    for method, row in config.METHOD_DEFAULTS.items():
        # The step schedule's boundaries and factors are in a row only with a step schedule.
        step = {"lr_boundaries", "lr_factors"} if row["lr_schedule"] == "step" else set()
        assert set(row) == AUTO - {"lr_boundaries", "lr_factors"} | step, method


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
