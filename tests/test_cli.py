"""`boneage --help` a newcomer can use: every option of every subcommand has a help text, defaults are shown,
the top-level help has examples."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from boneage.cli import _ServeWorkers, build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _walk(parser: argparse.ArgumentParser, prefix: str = "boneage"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{prefix} {name}")


def test_every_argument_of_every_subcommand_has_help():
    parser = build_parser()
    walked = list(_walk(parser))
    assert {name for name, _ in walked} >= {"boneage", "boneage train", "boneage predict", "boneage serve"}
    missing = []
    for name, p in walked:
        assert p.description, f"`{name} --help` has no description"
        for action in p._actions:
            if isinstance(action, _ServeWorkers):  # hidden on purpose: only says "use --threads"
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        for action in p._actions:  # each subcommand is listed with a one-line summary
            if isinstance(action, argparse._SubParsersAction):
                summaries = {a.dest: a.help for a in action._choices_actions}
                missing += [f"{name} {cmd} (summary)" for cmd in action.choices if not summaries.get(cmd)]
    assert not missing, f"arguments without a help text: {missing}"


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_help_shows_defaults(command, capsys):
    sub = _subparsers(build_parser())[command]
    text = " ".join(re.sub(r"-\n\s+", "-", sub.format_help()).split())  # undo argparse's line wrapping
    for action in sub._actions:
        meaningful = action.default not in (None, False, True, [], "", argparse.SUPPRESS)
        if action.option_strings and meaningful and action.nargs != 0:
            assert f"default: {action.default}" in text or "default" in (action.help or ""), \
                f"boneage {command} {action.option_strings[0]}: default {action.default!r} not shown"


def test_top_level_help_has_examples():
    text = build_parser().format_help()
    examples = text.split("examples:", 1)[1]
    commands = [line.split()[1] for line in examples.splitlines() if line.strip().startswith("boneage ")]
    assert 2 <= len(commands) <= 4 and {"train", "predict"} <= set(commands)
    for line in examples.splitlines():  # every example parses with the real parser
        line = line.split("#", 1)[0].strip()
        if line.startswith("boneage "):
            build_parser().parse_args(line.split()[1:])


def test_help_of_the_installed_command_runs():
    out = subprocess.run([sys.executable, "-m", "boneage.cli", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "examples:" in out and "--max-minutes" not in out and "train.max_minutes" in out
    assert re.search(r"--config CONFIG\s+shipped config name", out)


def test_predict_hands_one_typed_options_object_to_the_runner(monkeypatch):
    """Every flag of `boneage predict` lands in its field of ``PredictOptions``; the flags' defaults are the
    library's defaults."""
    import dataclasses

    from boneage import cli
    from boneage.inference import batch
    from boneage.inference.batch import PredictOptions

    seen = {}
    monkeypatch.setattr(batch, "run_predict", lambda options: seen.setdefault("options", options) and 0)
    argv = ["predict", "a.png", "b/", "--checkpoint", "m.onnx", "--sex", "F", "--chronological-age", "9y3m",
            "--no-tta", "--no-heatmap", "--interval-level", "0.8", "--right-hand", "--no-ood-check",
            "--batch-size", "4", "--workers", "2", "--device", "cpu", "--keep-identifiers", "--runtime", "onnx"]
    assert cli.main(argv) == 0
    assert dataclasses.asdict(seen["options"]) == dict(
        paths=["a.png", "b/"], checkpoints=["m.onnx"], sex="F", chronological_age="9y3m", out=None, tta=False,
        heatmap=False, interval_level=0.8, right_hand=True, ood_check=False, batch_size=4, workers=2,
        device="cpu", precision="fp32", keep_identifiers=True, runtime="onnx", header_check=True, recursive=False,
        table="csv", reports="all", pseudonym_key=None, engine="local", ray_address=None, dicom_out=None,
        dicomweb=None, study=None, since=None, store=False)
    defaults = cli._options(PredictOptions, build_parser().parse_args(["predict", "x.png", "--checkpoint", "m.pt"]),
                            checkpoints=["m.pt"])
    assert dataclasses.asdict(defaults) == dataclasses.asdict(PredictOptions(paths=["x.png"], checkpoints=["m.pt"]))


def test_workers_means_processes_everywhere_it_is_accepted():
    parser = build_parser()
    for command in ("train", "evaluate", "prepare", "predict"):
        action = next(a for a in _subparsers(parser)[command]._actions if "--workers" in a.option_strings)
        assert "process" in action.help, (command, action.help)
    serve = _subparsers(parser)["serve"]
    assert any("--threads" in a.option_strings for a in serve._actions)
