"""Training config: defaults are the official recipe (spec section 7), YAML + dotted overrides, clear errors."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from capi_backbones.cli.main import main
from capi_backbones.models import ARCHITECTURES, CapiConfig
from capi_backbones.train.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    dump_config,
    load_config,
    save_config,
)


def test_defaults_are_the_official_vitl_recipe():
    # values from CAPI_SPEC.md section 7 and the official default_pretrain_config.yaml
    c = TrainConfig().validate()
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads) == (1024, 24, 16)
    assert (c.model.pred_embed_dim, c.model.pred_depth, c.model.patch_size, c.model.n_registers) == (1024, 12, 14, 16)
    assert c.model.drop_path_rate == 0.2
    assert c.clustering.n_prototypes == 16384
    assert (c.clustering.target_temp, c.clustering.pred_temp, c.clustering.student_temp) == (0.06, 0.12, 0.12)
    assert c.clustering.n_sk_iter == 3 and c.clustering.positionwise and c.clustering.bias
    assert (c.clustering.lr, c.clustering.betas, c.clustering.weight_decay) == (5e-4, (0.9, 0.95), 0.01)
    assert (c.optim.lr, c.optim.betas, c.optim.weight_decay) == (1e-3, (0.9, 0.95), 0.1)
    assert (c.optim.total_steps, c.optim.warmup_steps, c.optim.truncate_cos) == (500_000, 50_000, 0.8)
    assert c.optim.batch_size == 16384  # global: 512 per GPU x 32 GPUs officially
    assert (c.optim.patch_embed_lr_mult, c.optim.rope_lr_mult, c.optim.norm_wd_mult) == (0.2, 0.0, 0.1)
    assert (c.optim.momentum_start, c.optim.momentum, c.optim.momentum_final) == (1.0, 0.999, 1.0)
    assert (c.data.mask_ratio, c.data.prediction_ratio) == (0.65, 0.05)
    assert (c.data.masking, c.data.roll) == ("inverse_block", True)
    assert (c.data.crop_scale, c.data.image_size, c.data.hflip) == ((0.6, 1.0), 224, True)
    assert not c.train.compile


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_match_the_architectures(name):
    config = load_config(name)
    if name != "tiny":
        expected = ARCHITECTURES[f"capi_{name}"]
        built = config.model
        assert isinstance(built, CapiConfig)
        for key in ("embed_dim", "depth", "num_heads", "pred_embed_dim", "pred_depth", "pred_num_heads"):
            assert getattr(built, key) == getattr(expected, key)
    else:
        assert config.train.device == "cpu" and config.data.image_size <= 112 and config.model.embed_dim <= 192


def test_yaml_with_preset_and_typed_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"preset": "tiny", "optim": {"lr": "5e-4", "batch_size": 32}, "data": {"root": "/images"}})
    )
    config = load_config(
        path,
        ["optim.total_steps=1e3", "data.hflip=false", "data.crop_scale=[0.5, 0.9]", "train.output_dir=runs/x",
         "clustering.betas=[0.8,0.9]", "model.drop_path_rate=0"],
    )  # fmt: skip
    assert config.model.embed_dim == PRESETS["tiny"]["model"]["embed_dim"]
    assert config.optim.lr == 5e-4 and isinstance(config.optim.lr, float)
    assert config.optim.batch_size == 32
    assert config.optim.total_steps == 1000 and isinstance(config.optim.total_steps, int)
    assert config.data.hflip is False
    assert config.data.crop_scale == (0.5, 0.9)
    assert config.clustering.betas == (0.8, 0.9)
    assert config.data.root == "/images" and config.train.output_dir == "runs/x"
    assert config.model.drop_path_rate == 0.0


def test_overrides_do_not_mutate_the_base():
    base = TrainConfig()
    changed = apply_overrides(base, ["optim.lr=0.5"])
    assert changed.optim.lr == 0.5 and base.optim.lr == 1e-3


def test_save_and_reload_round_trip(tmp_path):
    config = load_config("tiny", ["data.root=/x", "optim.betas=[0.5, 0.6]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(config)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.foo=1", "Valid keys: model.embed_dim"),
        ("nosection.lr=1", "Unknown config section 'nosection'"),
        ("optim.lr", "section.key=value"),
        ("lr=1", "section.key=value"),
        ("optim.lr=fast", "optim.lr expects float, got 'fast'"),
        ("optim.total_steps=1.5", "optim.total_steps expects int"),
        ("data.hflip=maybe", "data.hflip expects bool"),
        ("data.crop_scale=0.5", "data.crop_scale expects a list of 2 values"),
        ("data.image_size=100", "not a multiple of model.patch_size=14"),
        ("data.masking=random", "allowed: uniform, block, inverse_block"),
        ("train.parallel=zero", "allowed: ddp, fsdp"),
        ("optim.batch_size=0", "optim.batch_size must be >= 1"),
        ("data.crop_scale=[0.9,0.5]", "0 < low <= high <= 1"),
        ("data.crop_scale=[0.1,0.2,0.3]", "data.crop_scale expects a list of 2 values"),
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
        ("optim.weight_decay=-inf", "optim.weight_decay must be a finite number"),
        ("clustering.betas=[0.9, inf]", "clustering.betas must be a finite number"),
        ("optim.total_steps=true", "optim.total_steps expects int, got 'true'"),
        ("data.root=${nope}", "data.root: Interpolation key 'nope' not found"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("tiny", [override])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: Unknown config key 'optim.learning_rate'"):
        load_config(path)


def test_missing_config_and_bad_preset(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "p.yaml"
    path.write_text("preset: huge\n")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(path)


def test_cli_print_config_and_errors(capsys):
    assert main(["train", "tiny", "optim.lr=0.002", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.002 and printed["model"]["embed_dim"] == PRESETS["tiny"]["model"]["embed_dim"]
    assert main(["train", "tiny", "optim.nope=1"]) == 2
    assert "Unknown config key 'optim.nope'" in capsys.readouterr().err
    assert main(["train", "tiny"]) == 2  # no data.root
    assert "set data.root" in capsys.readouterr().err


def test_model_section_is_the_capi_config_and_old_files_still_load(tmp_path):
    """The model section is a CapiConfig (one architecture table); files written before in_chans / norm_eps were
    keys of the section load to the same model."""
    old_style = {"model": {"embed_dim": 384, "depth": 12, "num_heads": 6, "pred_embed_dim": 384, "pred_depth": 6,
                           "pred_num_heads": 6, "patch_size": 14, "n_registers": 16, "mlp_ratio": 4.0,
                           "drop_path_rate": 0.2}}  # fmt: skip
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old_style))
    config = load_config(path)
    assert isinstance(config.model, CapiConfig)
    assert (
        config.model
        == dataclasses.replace(ARCHITECTURES["capi_vits14"], drop_path_rate=0.2)
        == load_config("vits14").model
    )
    assert TrainConfig().model == dataclasses.replace(ARCHITECTURES["capi_vitl14"], drop_path_rate=0.2)
    with pytest.raises(ConfigError, match="model: encoder width 30 with 2 heads"):
        load_config("tiny", ["model.embed_dim=30", "model.num_heads=2"])


def test_yaml_values_as_older_versions_wrote_them(tmp_path):
    """Files written by hand or by earlier versions: numbers as strings (YAML reads 5e-4 and 1e3 as strings),
    integral floats for ints, tuples as lists, booleans as yes/no; a key missing from the file keeps its default."""
    path = tmp_path / "old.yaml"
    path.write_text(
        "optim:\n  lr: 5e-4\n  total_steps: 1e3\n  batch_size: 32.0\n  betas: [0.8, 0.9]\n"
        "data:\n  hflip: no\n  crop_scale: [0.5, 1]\n"
    )
    config = load_config(path)
    assert config.optim.lr == 5e-4 and config.optim.total_steps == 1000 and config.optim.batch_size == 32
    assert isinstance(config.optim.total_steps, int) and isinstance(config.optim.batch_size, int)
    assert config.optim.betas == (0.8, 0.9) and config.data.crop_scale == (0.5, 1.0)
    assert config.data.hflip is False and config.data.mask_ratio == TrainConfig().data.mask_ratio
    assert dump_config(load_config(path)) == dump_config(config)


def test_print_config_does_not_import_torch():
    code = (
        "import sys\n"
        "from capi_backbones.cli.main import main\n"
        "assert main(['train', 'tiny', 'optim.lr=0.002', '--print-config']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lr: 0.002" in done.stdout
