"""The command line's defaults are the library's: each option's default, as the CLI's own parser gives it, equals
the default of the library argument or dataclass field it is handed to (read through ``inspect.signature`` and
``dataclasses.fields``), and the help says the library's number. A change to one side alone fails here."""

import dataclasses
import inspect

import pytest

from capi_backbones import export
from capi_backbones.cli.main import build_parser, main
from capi_backbones.evals import datasets
from capi_backbones.evals.classification_protocol import ClassificationSettings
from capi_backbones.evals.knn import knn_classify
from capi_backbones.evals.probe_grid import CachedBatches, ProbeGrid, ProbeTrainingConfig
from capi_backbones.evals.segmentation import KNN_DTYPES, knn_segment
from capi_backbones.evals.segmentation_protocol import SegmentationSettings
from capi_backbones.features import FeatureExtractor
from capi_backbones.features.disk import extract_to_disk
from capi_backbones.features.shards import FORMATS
from capi_backbones.features.writer import STORAGE_DTYPES
from capi_backbones.runtime.precision import PRECISIONS
from capi_backbones.viz import explore, joint_pca_maps, pca_grid, pca_map, upsample
from capi_backbones.viz.grid import RESAMPLE_MODES

REQUIRED = {  # command -> the least that parses
    "extract": ["extract", "a.jpg", "--out", "out"],
    "pca": ["pca", "a.jpg", "--out", "out.png"],
    "explore": ["explore", "a.jpg", "--out", "out.html"],
    "export-onnx": ["export-onnx", "out.onnx"],
    "eval classify": ["eval", "classify", "data", "--out", "out"],
    "eval segment": ["eval", "segment", "data", "--out", "out"],
}


def cli_defaults(command: str) -> dict:
    """The parsed arguments of ``command`` given nothing but its required ones: every option at its default."""
    argv = REQUIRED[command]
    return vars(build_parser([argv[0]]).parse_args(argv))


def parameter_default(function, name: str):
    default = inspect.signature(function).parameters[name].default
    assert default is not inspect.Parameter.empty, f"{function.__qualname__}({name}) has no default"
    return default


def field_default(cls, name: str):
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return field.default


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare words


@pytest.mark.parametrize("command", ["extract", "pca", "explore", "eval classify", "eval segment"])
def test_batch_size_is_the_extractors(command):
    assert cli_defaults(command)["batch_size"] == parameter_default(FeatureExtractor, "batch_size")


def test_extract_defaults_are_extract_to_disks():
    args = cli_defaults("extract")
    for option, parameter in (("shard_size", "shard_size"), ("format", "format"), ("dtype", "dtype")):
        method = parameter_default(FeatureExtractor.extract_to_disk, parameter)
        assert method == parameter_default(extract_to_disk, parameter), parameter  # the method hands it on
        assert args[option] == method, f"--{option.replace('_', '-')}"
    assert args["precision"] == parameter_default(FeatureExtractor, "precision")


@pytest.mark.parametrize("command", ["extract", "pca"])
def test_choices_are_the_libraries(command, capsys):
    text = help_text([command], capsys)
    assert "--precision {" + ",".join(PRECISIONS) + "}" in text
    if command == "extract":
        assert "--format {" + ",".join(FORMATS) + "}" in text
        assert "--dtype {" + ",".join(STORAGE_DTYPES) + "}" in text


def test_extract_and_eval_decode_with_the_same_workers():
    assert cli_defaults("extract")["workers"] == cli_defaults("eval classify")["workers"]
    assert cli_defaults("eval segment")["workers"] == cli_defaults("eval classify")["workers"]


def test_pca_defaults_are_the_viz_functions():
    args = cli_defaults("pca")
    assert args["components"] == parameter_default(pca_map, "n_components")
    assert args["components"] == parameter_default(joint_pca_maps, "n_components")
    assert args["tile_height"] == parameter_default(pca_grid, "tile_height")
    assert args["resample"] == parameter_default(pca_grid, "resample") == parameter_default(upsample, "resample")
    assert args["precision"] == parameter_default(FeatureExtractor, "precision")


def test_pca_resample_choices_are_the_grids(capsys):
    text = help_text(["pca"], capsys)
    assert "--resample {" + ",".join(RESAMPLE_MODES) + "}" in text


def test_classify_defaults_are_the_protocols():
    args = cli_defaults("eval classify")
    assert args["probes"] == field_default(ClassificationSettings, "probes")
    assert args["representations"] == field_default(ClassificationSettings, "representations")
    assert args["knn_k"] == field_default(ClassificationSettings, "knn_ks") == parameter_default(knn_classify, "ks")
    assert args["head_dim"] == field_default(ClassificationSettings, "head_dim")
    assert args["head_dim"] == parameter_default(ProbeGrid, "head_dim")
    assert args["seed"] == field_default(ProbeTrainingConfig, "seed") == field_default(CachedBatches, "seed")
    assert args["probe_dtype"] == field_default(ProbeTrainingConfig, "dtype")


def test_classify_help_says_the_official_training(capsys):
    """--iters and --probe-batch-size default to None (the protocol's numbers apply); their help says those."""
    text = help_text(["eval", "classify"], capsys)
    iterations = field_default(ProbeTrainingConfig, "iterations")
    batch = field_default(ProbeTrainingConfig, "batch_size")
    assert f"probe training steps (default {iterations}, official)" in text
    assert f"global probe batch (default {batch}, official" in text
    assert f"official protocol ({iterations:,} steps of a global batch of {batch}" in text
    assert f"lr grid (default: official {len(field_default(ProbeTrainingConfig, 'learning_rates'))})" in text
    assert f"wd grid (default: official {len(field_default(ProbeTrainingConfig, 'weight_decays'))})" in text
    assert f"attentive probe head size (default {field_default(ClassificationSettings, 'head_dim')})" in text
    assert f"DATA/<class>/* (a seeded {datasets.TEST_FRACTION:.0%} is test)" in text
    assert f"else on a seeded {datasets.SELECTION_FRACTION:.0%} of train" in text


def test_segment_defaults_are_the_protocols():
    args = cli_defaults("eval segment")
    for option, name in (
        ("classifiers", "classifiers"),
        ("ks", "ks"),
        ("distances", "distances"),
        ("ignore_labels", "ignore_labels"),
        ("knn_dtype", "knn_dtype"),
        ("pictures", "n_pictures"),
    ):
        assert args[option] == field_default(SegmentationSettings, name), f"--{option.replace('_', '-')}"
    assert args["ks"] == parameter_default(knn_segment, "ks")
    assert args["ignore_labels"] == parameter_default(knn_segment, "ignore_labels")


def test_segment_knn_dtype_choices_are_the_segmentations(capsys):
    text = help_text(["eval", "segment"], capsys)
    assert "--knn-dtype {" + ",".join(KNN_DTYPES) + "}" in text


def test_explore_defaults_and_limits_are_the_pages(capsys):
    assert cli_defaults("explore")["title"] == parameter_default(explore.build_explorer, "title")
    text = help_text(["explore"], capsys)
    limits = (explore.MAX_PHOTOS, explore.MAX_PATCHES, explore.MAX_STORED_VALUES)
    assert "Limits per page: {} photos, {} patches per model, {} stored feature values".format(*limits) in text


def test_export_outputs_and_opset_are_the_exporters():
    from capi_backbones.cli import export_commands

    assert cli_defaults("export-onnx")["outputs"] == list(export.OUTPUTS)
    assert export_commands.MIN_OPSET == export.MIN_OPSET  # the CLI checks --opset before torch is imported
