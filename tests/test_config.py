"""Config: defaults < YAML file < key=value overrides, strict keys and types, one-line errors."""

import pytest

from imgcls.config import Config, config_from_dict, config_to_dict, load_config, save_config, valid_keys
from imgcls.errors import ImgclsError


def write_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_load():
    config = load_config()
    assert config == Config()
    assert config.train.epochs is None  # auto: 10, or what train.max_minutes allows
    assert config.optim.name == "adamw"
    assert config.run.dir == "runs"
    assert config.run.name is None
    assert config.data.on_bad_image == "skip"


def test_fixed_key_names_exist():
    # other code, docs and saved configs refer to these names: renaming one is a breaking change
    keys = set(valid_keys())
    expected = {
        "model.name", "model.pretrained", "data.image_size", "data.on_bad_image", "train.epochs",
        "train.batch_size", "train.deterministic", "optim.name", "optim.lr", "seed", "device", "run.name", "run.dir",
    }
    assert expected <= keys
    assert all(not key.endswith("Config") for key in keys)  # sections are expanded, never listed as keys


def test_yaml_overrides_defaults_and_command_line_overrides_yaml(tmp_path):
    path = write_yaml(tmp_path, "train:\n  epochs: 3\n  batch_size: 8\noptim:\n  name: sgd\n")
    config = load_config(path, ["train.epochs=5", "seed=7"])
    assert config.train.epochs == 5  # override beats file
    assert config.train.batch_size == 8  # file beats default
    assert config.optim.name == "sgd"
    assert config.seed == 7
    assert config.optim.lr == Config().optim.lr  # untouched keys keep their defaults


def test_later_override_wins():
    assert load_config(overrides=["train.epochs=2", "train.epochs=4"]).train.epochs == 4


def test_override_values_are_typed():
    config = load_config(overrides=[
        "optim.lr=0.5", "train.deterministic=true", "data.image_size=32", "model.pretrained=weights.pt",
    ])
    assert config.optim.lr == 0.5
    assert config.train.deterministic is True
    assert config.data.image_size == 32
    assert config.model.pretrained == "weights.pt"


def test_override_to_null_for_optional_key():
    assert load_config(overrides=["data.image_size=32", "data.image_size=null"]).data.image_size is None


@pytest.mark.parametrize(("override", "suggestion"), [
    ("train.epoch=3", "train.epochs"),
    ("model.nme=resnet18", "model.name"),
    ("optim.lrr=0.1", "optim.lr"),
])
def test_unknown_override_key_suggests_closest(override, suggestion):
    with pytest.raises(ImgclsError) as error:
        load_config(overrides=[override])
    message = str(error.value)
    assert "unknown config key" in message
    assert f"'{suggestion}'" in message


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ImgclsError, match="valid top-level keys: .*train"):
        load_config(overrides=["zzzz=1"])
    with pytest.raises(ImgclsError, match="valid keys in 'train': .*train.epochs"):
        load_config(overrides=["train.zzzzzzz=1"])
    with pytest.raises(ImgclsError, match="did you mean 'train.epochs'"):
        load_config(overrides=["trian.epochs=1"])


def test_unknown_key_in_yaml_names_file_and_suggestion(tmp_path):
    path = write_yaml(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ImgclsError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert "train.epochs" in str(error.value)


def test_wrong_type_says_what_is_expected():
    with pytest.raises(ImgclsError, match=r"train\.epochs.*'abc'.*Integer"):
        load_config(overrides=["train.epochs=abc"])
    with pytest.raises(ImgclsError, match=r"train\.deterministic.*'maybe'.*bool"):
        load_config(overrides=["train.deterministic=maybe"])


def test_wrong_type_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: many\n")
    with pytest.raises(ImgclsError, match=r"train\.batch_size"):
        load_config(path)


@pytest.mark.parametrize(("override", "allowed"), [
    ("optim.name=adam", ["adamw", "sgd"]),
    ("data.resize=stretch", ["crop", "pad", "squish"]),
    ("data.on_bad_image=ignore", ["skip", "fail"]),
])
def test_invalid_choice_lists_allowed_values(override, allowed):
    with pytest.raises(ImgclsError) as error:
        load_config(overrides=[override])
    message = str(error.value)
    assert override.split("=")[0] in message
    for choice in allowed:
        assert f"'{choice}'" in message


def test_invalid_choice_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  scheduler: linear\n")
    with pytest.raises(ImgclsError, match="cosine"):
        load_config(path)


@pytest.mark.parametrize(("override", "key"), [
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.test_fraction=-0.1", "data.test_fraction"),
    ("loss.label_smoothing=1", "loss.label_smoothing"),
    ("data.image_size=4", "data.image_size"),
    ("train.patience=0", "train.patience"),
])
def test_out_of_range_values_are_errors(override, key):
    with pytest.raises(ImgclsError, match=f"'{key}'"):
        load_config(overrides=[override])


def test_override_without_equals_sign():
    with pytest.raises(ImgclsError, match="key=value"):
        load_config(overrides=["train.epochs"])


def test_missing_and_unparsable_config_files(tmp_path):
    with pytest.raises(ImgclsError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ImgclsError, match="cannot read config file"):
        load_config(write_yaml(tmp_path, "train: [1\n"))


def test_save_then_load_gives_equal_config(tmp_path):
    config = load_config(overrides=[
        "train.epochs=3", "optim.name=sgd", "data.image_size=48", "run.name=first", "train.patience=2",
        "model.pretrained=/weights/start.safetensors", "train.deterministic=true",
    ])
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert load_config(path) != Config()


def test_dict_round_trip():
    config = load_config(overrides=["seed=3", "data.resize=pad", "train.grad_clip=1.5"])
    values = config_to_dict(config)
    assert isinstance(values, dict)
    assert values["train"]["grad_clip"] == 1.5
    assert values["data"]["resize"] == "pad"
    assert config_from_dict(values) == config


def test_config_from_dict_rejects_unknown_keys():
    values = config_to_dict(Config())
    values["train"]["epoch"] = 3
    with pytest.raises(ImgclsError, match="train.epochs"):
        config_from_dict(values)
