"""The CLI's own options and messages: --version, the command table, the shared model options."""

import re

import pytest

from capi_backbones import __version__
from capi_backbones.cli.main import COMMANDS, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"capi-backbones {__version__}"


def test_the_command_table_matches_the_modules(capsys):
    """Each command is registered by the module COMMANDS names, and --help lists every command."""
    full = build_parser()._subparsers._group_actions[0].choices  # every module registered
    assert list(full) == list(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        parser = full[name]
        if parser.get_default("handler") is None:  # a command with its own subcommands (eval PROTOCOL)
            parser = next(iter(parser._subparsers._group_actions[0].choices.values()))
        assert parser.get_default("handler").__module__ == module, name
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert all(re.search(rf"^    {name}(\s|$)", listed, re.M) for name in COMMANDS), listed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "nonsense"], "--device nonsense is not a device; use --device cpu"),
        (
            ["--device", "cpu", "--random-init", "--model", "capi_vitx"],
            "--model capi_vitx is unknown; with --random-init",
        ),
        (["--device", "cpu", "--precision", "fp16"], "--precision fp16 is only allowed on CUDA (device is cpu)"),
    ],
)
def test_model_option_errors_name_the_option(tmp_path, capsys, extra, message):
    (tmp_path / "a.png").write_bytes(b"")  # never read: the options fail first
    assert main(["extract", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), *extra]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and message in errors[0], errors
    assert "device='" not in errors[0] and "precision='" not in errors[0]
