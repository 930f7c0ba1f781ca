from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY, run_in_process

from dcgan.config import Config, ConfigError, config_from_dict, keys_help, load_config, save_config


def test_defaults_are_the_paper_recipe() -> None:
    c = Config()
    assert (c.model.resolution, c.model.nz, c.model.ngf, c.model.ndf, c.model.channels) == (64, 100, 64, 64, 3)
    assert (c.train.batch_size, c.optim.lr, c.optim.beta1) == (128, 2e-4, 0.5)


def test_yaml_and_dotted_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {resolution: 32, channels: 1}\ntrain: {steps: 5}\n")
    c = load_config(path, ["train.steps=7", "optim.lr=1e-3", "log.tags=[a, b]", "run.dir=/x/y", "data.resampled=false"])
    assert c.model.resolution == 32 and c.train.steps == 7 and c.optim.lr == 1e-3
    assert c.log.tags == ("a", "b") and c.run.dir == "/x/y" and c.data.resampled is False
    assert load_config(path, ["log.tags=x,y"]).log.tags == ("x", "y")
    assert isinstance(load_config(path, ["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.resoluton=64", "unknown key 'model.resoluton'"),
        ("nope.x=1", "unknown key 'nope'"),
        ("model.resolution=8", "model.resolution: must be a power of two >= 16, got 8"),
        ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
        ("train.steps=1.5", "train.steps: expected an integer, got 1.5"),
        ("train.compile=maybe", "train.compile: expected true or false, got 'maybe'"),
        ("log.wandb=cloud", "log.wandb: expected offline | online | disabled, got 'cloud'"),
        ("train.precision=int8", "train.precision: expected auto | fp32 | bf16 | fp16"),
        ("optim.beta1=1.0", "optim.beta1: must be in [0, 1), got 1.0"),
        ("optim.lr_d=0", "optim.lr_d: must be null or a finite number > 0, got 0.0"),
        ("optim.lr_g=fast", "optim.lr_g: expected a number or null, got 'fast'"),
        ("optim.beta2_g=1", "optim.beta2_g: must be null or in [0, 1), got 1.0"),
        ("optim.beta1_d=-0.1", "optim.beta1_d: must be null or in [0, 1), got -0.1"),
        ("loss.kind=wgan", "loss.kind: expected bce | hinge | lsgan, got 'wgan'"),
        ("model.spectral_norm=g", "model.spectral_norm: expected none | d | both, got 'g'"),
        ("loss.r1=-1", "loss.r1: must be a finite number >= 0 (0 = off), got -1.0"),
        ("loss.r1_every=0", "loss.r1_every: must be >= 1, got 0"),
        ("model.channels=3", "model.channels: must be 1 for the built-in digits"),
        ("model.channels=2", "model.channels: must be 1 or 3, got 2"),
        ("model=3", "model: expected a section of keys"),
        ("train.steps", "override 'train.steps' must look like key=value"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "digits.yaml", [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_r1_is_refused_with_cuda_graphs_in_one_line() -> None:
    """A CUDA graph replays one kind of step; R1 adds a second: refused when the config loads, not on a GPU."""
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "digits.yaml", ["train.device=cuda", "train.cuda_graph=true", "loss.r1=1"])
    assert str(info.value).startswith("loss.r1: must be 0 with train.cuda_graph")
    assert load_config(ROOT / "configs" / "digits.yaml", ["train.device=cuda", "loss.r1=1"]).loss.r1 == 1


def test_per_network_adam_settings_default_to_the_shared_ones_and_round_trip(tmp_path: Path) -> None:
    paper = load_config(TINY)
    assert (paper.loss.kind, paper.model.spectral_norm) == ("bce", "none")
    assert paper.optim.adam("G") == paper.optim.adam("D") == (2e-4, (0.5, 0.999))
    assert not paper.optim.per_network_lr
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {channels: 1}\noptim: {lr_d: 4e-4, beta1_d: 0, beta2_d: 0.9, lr_g: null}\nloss: {kind: lsgan}\n"
    )
    ttur = load_config(path, ["optim.beta1_g=0.0", "model.spectral_norm=d"])
    assert ttur.optim.adam("D") == (4e-4, (0.0, 0.9)) and ttur.optim.adam("G") == (2e-4, (0.0, 0.999))
    assert ttur.optim.per_network_lr and ttur.loss.kind == "lsgan" and ttur.model.spectral_norm == "d"
    assert load_config(path, ["optim.lr_d=null"]).optim.lr_d is None  # unset again on the command line
    save_config(ttur, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == ttur
    assert "lr_g: null" in (tmp_path / "saved.yaml").read_text()


def test_a_checkpoint_from_before_spectral_norm_and_d_norm_counts_as_the_paper_and_another_setting_is_refused(
    tmp_path: Path,
) -> None:
    from dcgan.config import config_to_dict
    from dcgan.errors import IncompatibleCheckpoint
    from dcgan.run.schema import check_compatible

    config = load_config(TINY)
    saved = config_to_dict(config)
    del saved["model"]["spectral_norm"], saved["model"]["d_norm"]  # written before the keys existed
    check_compatible(saved, config, tmp_path)
    with pytest.raises(IncompatibleCheckpoint) as refused:
        check_compatible(saved, load_config(TINY, ["model.spectral_norm=d", "model.d_norm=none"]), tmp_path)
    assert str(refused.value) == (
        f"checkpoint {tmp_path} belongs to another model (model.spectral_norm: checkpoint 'none', config 'd'; "
        "model.d_norm: checkpoint 'batch', config 'none'): use a new run.dir or the checkpoint's model settings"
    )


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    c = load_config(ROOT / "configs" / "digits.yaml", ["log.tags=[x]", "train.steps=3"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == c


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    load_config(ROOT / "configs" / name)


def test_a_bad_value_on_the_command_line_is_one_line_status_2_and_creates_nothing(tmp_path: Path) -> None:
    result = run_in_process("train", "configs/tiny.yaml", "model.resolution=48", f"run.dir={tmp_path}/r", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "dcgan: error: model.resolution: must be a power of two >= 16, got 48"
    assert not (tmp_path / "r").exists()


def test_impossible_settings_fail_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"optim.lr: must be a finite number > 0, got inf"):
        load_config(TINY, ["optim.lr=.inf"])
    assert load_config(TINY, ["run.dir=~/runs/x"]).run.dir == str(Path.home() / "runs" / "x")


def test_train_help_lists_every_contract_key() -> None:
    """`dcgan train --help` carries the table of config keys (the top-level help: test_cli)."""
    help_text = run_in_process("train", "--help").stdout
    assert keys_help() in help_text
    for key in (
        "seed",
        "run.dir",
        "model.resolution",
        "model.nz",
        "model.ngf",
        "model.ndf",
        "model.channels",
        "train.steps",
        "train.batch_size",
        "optim.lr",
        "optim.beta1",
        "optim.beta2",
        "optim.lr_g",
        "optim.lr_d",
        "optim.beta1_g",
        "optim.beta1_d",
        "optim.beta2_g",
        "optim.beta2_d",
        "loss.kind",
        "model.spectral_norm",
        "data.shards",
        "log.every",
        "sample.every",
        "checkpoint.every",
        "log.wandb",
    ):
        assert f"  {key} " in help_text


def test_the_sngan_preset_trains_exactly_the_setting_docs_quality_md_measured() -> None:
    """configs/digits-sngan.yaml is configs/digits.yaml with the overrides of quality.md's SN-GAN arm at its
    budget: the preset cannot drift from the evidence behind it (the sections that shape the trained weights
    are equal; only where checkpoints, samples and logs go differs)."""
    from dcgan.config import config_to_dict

    shell = (ROOT / "docs" / "quality.md").read_text().split('SNGAN="', 1)[1].split('"', 1)[0]
    budget = ["train.steps=780", "train.batch_size=128"]
    measured = config_to_dict(load_config(ROOT / "configs" / "digits.yaml", [*budget, *shell.split()]))
    preset = config_to_dict(load_config(ROOT / "configs" / "digits-sngan.yaml"))
    for section in ("seed", "model", "data", "train", "optim", "loss"):
        assert preset[section] == measured[section], section
    assert preset["model"]["d_norm"] == "none" and preset["loss"]["kind"] == "hinge"
