"""Every option says what it does; `clfpipe --version` answers."""

import argparse

import pytest

from clfpipe import __version__
from clfpipe.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "clfpipe"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_and_command_has_help():
    missing = []
    for path, parser in _parsers(build_parser()):
        assert parser.description or path == "clfpipe", path
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_defaults_are_shown_and_none_is_not(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1,2,4,8,16)" in text and "(default: classifier)" in text and "(default: None)" not in text
    assert "the one 'clfpipe serve up' recorded" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"clfpipe {__version__}"
