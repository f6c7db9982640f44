"""The Makefile and .apolo/live.yml, checked offline.

* The real make targets run with a fake ``apolo`` first on PATH (tests/fake_apolo/apolo.py),
  which records every call; the tests assert the exact sequence of calls and arguments.
* Every recorded call (and every ``apolo run`` apolo-flow would issue for live.yml) is then
  checked against the option definitions of the installed apolo CLI's click commands, so a
  removed, renamed or misspelled flag fails here rather than on the platform.
* The Makefile is parsed: every target has a ``## description`` that ``make help`` shows,
  every target is .PHONY, every user variable is ``?=`` with a comment and a row in
  docs/platform.md (tests/test_docs.py checks the defaults, the README and .ci/run).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
LIVE_YML = ROOT / ".apolo" / "live.yml"
FAKE_APOLO = ROOT / "tests" / "fake_apolo" / "apolo.py"
PLATFORM_DOC = ROOT / "docs" / "platform.md"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")

# Defaults the assertions below spell out (they must agree with the Makefile's).
STORAGE = "storage:boneage"
IMAGE = "image:boneage:latest"
TAG = "project:boneage"
UPLOAD_CODE = [
    ["mkdir", "--parents", f"{STORAGE}/src"],
    ["cp", "--recursive", "--update", "--no-target-directory",
     "--exclude", "__pycache__", "--exclude", "*.pyc", "--exclude", "*.egg-info",
     "src", f"{STORAGE}/src"],
]
UPLOAD_NOTEBOOKS = [
    ["mkdir", "--parents", f"{STORAGE}/notebooks"],
    ["cp", "--recursive", "--update", "--no-target-directory", "notebooks", f"{STORAGE}/notebooks"],
]
TRAIN_VOLUMES = [
    "--volume", f"{STORAGE}/src:/boneage/src:ro",
    "--volume", f"{STORAGE}/data:/boneage/data:ro",
    "--volume", f"{STORAGE}/results:/boneage/results:rw",
]
REQUIRED_TARGETS = {
    "help", "setup", "upload-code", "upload-data", "upload-notebooks", "download-notebooks",
    "download-results", "clean-code", "clean-data", "clean-notebooks", "clean-results",
    "training", "training-ddp", "kill-training", "connect-training", "jupyter", "kill-jupyter",
    "tensorboard", "kill-tensorboard", "filebrowser", "kill-filebrowser", "ps", "kill",
    "setup-local", "train-local", "jupyter-local", "tensorboard-local", "test", "lint", "demo",
    "bench", "bench-quick", "bench-serve", "notebook-html", "clean-local",
}


# --------------------------------------------------------------------------------------
# Makefile parsing
# --------------------------------------------------------------------------------------

def _makefile_lines() -> list[str]:
    """The Makefile's lines, without the bodies of ``define ... endef`` blocks (embedded scripts)."""
    lines, in_define = [], False
    for line in MAKEFILE.read_text(encoding="utf-8").splitlines():
        if re.match(r"^define\s", line):
            in_define = True
        elif in_define and line.strip() == "endef":
            in_define = False
        elif not in_define:
            lines.append(line)
    return lines


RULE_RE = re.compile(r"^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:(?![=:])(.*)$")
USER_VAR_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*\?=")
ANY_ASSIGN_RE = re.compile(r"^([A-Za-z_.][A-Za-z0-9_.]*)\s*(?:\?=|:=|::=|\+=|!=|=)")


def makefile_rules() -> dict[str, str | None]:
    """target -> description ('## ...' after the prerequisites) or None."""
    rules: dict[str, str | None] = {}
    for line in _makefile_lines():
        if line.startswith(("\t", "#")) or ANY_ASSIGN_RE.match(line):
            continue
        m = RULE_RE.match(line)
        if not m:
            continue
        targets, rest = m.group(1).split(), m.group(2)
        if any(t.startswith(".") for t in targets):  # .PHONY, .DEFAULT_GOAL, ...
            continue
        desc = rest.split("## ", 1)[1].strip() if "## " in rest else None
        for t in targets:
            rules[t] = desc
    return rules


def makefile_phony() -> set[str]:
    phony: set[str] = set()
    for line in _makefile_lines():
        if line.startswith(".PHONY:"):
            phony.update(line.split(":", 1)[1].split())
    return phony


def makefile_user_vars() -> list[str]:
    return [m.group(1) for line in _makefile_lines() if (m := USER_VAR_RE.match(line))]


# --------------------------------------------------------------------------------------
# Running make with the fake apolo
# --------------------------------------------------------------------------------------

@pytest.fixture
def fake(tmp_path):
    """Environment with fake `apolo` and `neuro` first on PATH; returns a runner."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("apolo", "neuro"):
        wrapper = bin_dir / prog
        wrapper.write_text(
            f'#!/bin/sh\nFAKE_APOLO_PROG={prog} exec "{sys.executable}" "{FAKE_APOLO}" "$@"\n'
        )
        wrapper.chmod(0o755)
    log = tmp_path / "calls.jsonl"

    env = {k: v for k, v in os.environ.items() if k not in set(makefile_user_vars())}
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES", "GNUMAKEFLAGS"):
        env.pop(k, None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["FAKE_APOLO_LOG"] = str(log)

    class Runner:
        def __init__(self) -> None:
            self.env = env
            self.log = log

        def make(self, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
            if log.exists():
                log.unlink()
            proc = subprocess.run(
                ["make", "--no-print-directory", "-s", *args], cwd=ROOT,
                env={**env, **extra_env}, capture_output=True, text=True, timeout=120,
            )
            if check:
                assert proc.returncode == 0, f"make {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
            return proc

        def records(self) -> list[dict]:
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

        def calls(self) -> list[list[str]]:
            return [r["argv"] for r in self.records()]

    return Runner()


def _run_call(calls: list[list[str]]) -> list[str]:
    runs = [c for c in calls if c and c[0] == "run"]
    assert len(runs) == 1, calls
    return runs[0]


def _job_command(call: list[str]) -> list[str]:
    assert "--" in call, f"the job command must follow `--`: {call}"
    return call[call.index("--") + 1:]


# --------------------------------------------------------------------------------------
# Exact call sequences
# --------------------------------------------------------------------------------------

def test_setup_builds_image_in_a_job_then_saves_and_kills_it(fake):
    fake.make("setup")
    calls = fake.calls()
    assert calls[:2] == UPLOAD_CODE
    assert calls[2:6] == [
        ["kill", "setup-boneage"],
        ["mkdir", "--parents", STORAGE],
        ["cp", "--update", "--target-directory", STORAGE,
         "requirements.txt", "apt.txt", "setup.cfg", "pyproject.toml", "README.md"],
        ["run", "--name", "setup-boneage", "--preset", "cpu-small", "--detach", "--life-span", "4h",
         "--tag", TAG, "--volume", f"{STORAGE}:/boneage:ro", "python:3.11-slim-bookworm",
         "--", "sleep", "infinity"],
    ]
    apt, pip = calls[6], calls[7]
    assert apt[:6] == ["exec", "--no-tty", "setup-boneage", "--", "bash", "-c"] and len(apt) == 7
    assert "apt-get -qq update" in apt[6] and "/boneage/apt.txt" in apt[6]
    assert "--no-install-recommends" in apt[6] and "rm -rf /var/lib/apt/lists/*" in apt[6]
    assert pip[:6] == ["exec", "--no-tty", "setup-boneage", "--", "bash", "-c"] and len(pip) == 7
    assert "-r /boneage/requirements.txt" in pip[6]
    assert "--no-deps /tmp/boneage-build" in pip[6]
    assert calls[8:] == [
        ["--network-timeout", "300", "job", "save", "setup-boneage", IMAGE],
        ["kill", "setup-boneage"],
    ]


def test_setup_continues_when_no_stale_setup_job_exists(fake):
    # The first kill (of a stale setup job) fails when there is none: setup must go on.
    proc = fake.make("setup", check=False, FAKE_APOLO_FAIL="kill")
    calls = fake.calls()
    assert ["--network-timeout", "300", "job", "save", "setup-boneage", IMAGE] in calls
    assert proc.returncode != 0  # ... but the final kill failing is reported


def test_training_runs_resumable_gpu_job(fake):
    proc = fake.make("training")
    calls = fake.calls()
    assert calls[:2] == UPLOAD_CODE
    assert calls[2:] == [[
        "run", "--name", "training-boneage", "--preset", "gpu-small", "--detach",
        "--restart", "on-failure", "--life-span", "1d", "--tag", TAG,
        *TRAIN_VOLUMES,
        "--env", "PYTHONPATH=/boneage/src", "--workdir", "/boneage",
        IMAGE, "--",
        "boneage", "train", "--config", "paper-m46",
        "--images", "/boneage/data/images", "--labels", "/boneage/data/labels.csv",
        "--out", "/boneage/results/paper-m46", "--resume",
    ]]
    assert "apolo logs training-boneage" in proc.stdout


def test_training_variables_are_overridable(fake):
    fake.make(
        "training", "CONFIG=resnet50", "TRAINING_PRESET=gpu-large", "TRAINING_RESTART=never",
        "TRAIN_EXTRA=train.epochs=3 --cache-dir /boneage/results/cache", "PROJECT=ba2",
        "IMAGES_SUBDIR=boneage-training-dataset", "LABELS_FILE=train.csv",
    )
    run = _run_call(fake.calls())
    assert run[run.index("--preset") + 1] == "gpu-large"
    assert run[run.index("--restart") + 1] == "never"
    assert run[run.index("--name") + 1] == "training-ba2"
    assert "storage:ba2/data:/ba2/data:ro" in run
    assert run[run.index("--") - 1] == "image:ba2:latest"
    assert _job_command(run) == [
        "boneage", "train", "--config", "resnet50",
        "--images", "/ba2/data/boneage-training-dataset", "--labels", "/ba2/data/train.csv",
        "--out", "/ba2/results/resnet50", "--resume",
        "train.epochs=3", "--cache-dir", "/boneage/results/cache",
    ]


def test_training_with_config_path_names_run_after_the_file(fake):
    fake.make("training", "CONFIG=configs/my-exp.yaml")
    cmd = _job_command(_run_call(fake.calls()))
    assert cmd[cmd.index("--config") + 1] == "configs/my-exp.yaml"
    assert cmd[cmd.index("--out") + 1] == "/boneage/results/my-exp"


def test_training_ddp_uses_multi_gpu_preset_and_ddp_engine(fake):
    fake.make("training-ddp", "DDP_GPUS=4", "DDP_PRESET=gpu-4x")
    calls = fake.calls()
    assert calls[:2] == UPLOAD_CODE
    assert calls[2:] == [[
        "run", "--name", "training-ddp-boneage", "--preset", "gpu-4x", "--detach",
        "--restart", "on-failure", "--life-span", "1d", "--tag", TAG,
        *TRAIN_VOLUMES,
        "--env", "PYTHONPATH=/boneage/src", "--workdir", "/boneage",
        IMAGE, "--",
        "boneage", "train", "--config", "paper-m46",
        "--images", "/boneage/data/images", "--labels", "/boneage/data/labels.csv",
        "--out", "/boneage/results/paper-m46-ddp", "--resume",
        "--engine", "ddp", "--ddp-workers", "4",
    ]]


def test_jupyter(fake):
    fake.make("jupyter")
    calls = fake.calls()
    assert calls[:4] == UPLOAD_CODE + UPLOAD_NOTEBOOKS
    assert calls[4:] == [[
        "run", "--name", "jupyter-boneage", "--preset", "gpu-small", "--http-port", "8888",
        "--http-auth", "--browse", "--detach", "--tag", TAG,
        "--volume", f"{STORAGE}/src:/boneage/src:ro",
        "--volume", f"{STORAGE}/data:/boneage/data:ro",
        "--volume", f"{STORAGE}/notebooks:/boneage/notebooks:rw",
        "--volume", f"{STORAGE}/results:/boneage/results:rw",
        "--env", "PYTHONPATH=/boneage/src", "--workdir", "/boneage",
        IMAGE, "--",
        "jupyter", "lab", "--no-browser", "--ip=0.0.0.0", "--port=8888", "--allow-root",
        "--IdentityProvider.token=", "--ServerApp.root_dir=/boneage",
    ]]


def test_http_auth_can_be_switched_off(fake):
    fake.make("jupyter", "HTTP_AUTH=--no-http-auth")
    run = _run_call(fake.calls())
    assert "--no-http-auth" in run and "--http-auth" not in run


def test_tensorboard(fake):
    fake.make("tensorboard")
    assert fake.calls() == [[
        "run", "--name", "tensorboard-boneage", "--preset", "cpu-small", "--http-port", "6006",
        "--http-auth", "--browse", "--detach", "--tag", TAG,
        "--volume", f"{STORAGE}/results:/boneage/results:ro",
        IMAGE, "--", "tensorboard", "--host=0.0.0.0", "--port=6006", "--logdir=/boneage/results",
    ]]


def test_filebrowser(fake):
    fake.make("filebrowser")
    assert fake.calls() == [[
        "run", "--name", "filebrowser-boneage", "--preset", "cpu-small", "--http-port", "80",
        "--http-auth", "--browse", "--detach", "--tag", TAG,
        "--volume", f"{STORAGE}:/srv:rw",
        "filebrowser/filebrowser:latest", "--",
        "--noauth", "--address=0.0.0.0", "--port=80", "--root=/srv", "--database=/tmp/filebrowser.db",
    ]]


def test_storage_targets(fake, tmp_path):
    data = tmp_path / "mydata"
    (data / "images").mkdir(parents=True)
    expected = {
        ("upload-code",): UPLOAD_CODE,
        ("upload-notebooks",): UPLOAD_NOTEBOOKS,
        ("upload",): UPLOAD_CODE + UPLOAD_NOTEBOOKS,
        ("upload-data", f"DATA_DIR={data}"): [
            ["mkdir", "--parents", f"{STORAGE}/data"],
            ["cp", "--recursive", "--update", "--no-target-directory", str(data), f"{STORAGE}/data"],
        ],
        ("download-results",): [
            ["cp", "--recursive", "--update", "--no-target-directory", f"{STORAGE}/results", "results"]],
        ("download-results", "RESULTS_DIR=/tmp/r"): [
            ["cp", "--recursive", "--update", "--no-target-directory", f"{STORAGE}/results", "/tmp/r"]],
        ("download-notebooks",): [
            ["cp", "--recursive", "--update", "--no-target-directory", f"{STORAGE}/notebooks", "notebooks"]],
        ("clean-code",): [["rm", "--recursive", f"{STORAGE}/src"]],
        ("clean-data",): [["rm", "--recursive", f"{STORAGE}/data"]],
        ("clean-notebooks",): [["rm", "--recursive", f"{STORAGE}/notebooks"]],
        ("clean-results",): [["rm", "--recursive", f"{STORAGE}/results"]],
        ("upload-code", "PROJECT_STORAGE=storage:/other-project/ba"): [
            ["mkdir", "--parents", "storage:/other-project/ba/src"],
            ["cp", "--recursive", "--update", "--no-target-directory",
             "--exclude", "__pycache__", "--exclude", "*.pyc", "--exclude", "*.egg-info",
             "src", "storage:/other-project/ba/src"],
        ],
    }
    for args, calls in expected.items():
        fake.make(*args)
        assert fake.calls() == calls, args


def test_upload_data_refuses_missing_folder(fake, tmp_path):
    proc = fake.make("upload-data", f"DATA_DIR={tmp_path / 'nope'}", check=False)
    assert proc.returncode != 0
    assert "is not a folder" in proc.stderr
    assert fake.calls() == []


def test_job_control_targets(fake):
    expected = {
        "kill-training": [["kill", "training-boneage"]],
        "kill-training-ddp": [["kill", "training-ddp-boneage"]],
        "kill-jupyter": [["kill", "jupyter-boneage"]],
        "kill-tensorboard": [["kill", "tensorboard-boneage"]],
        "kill-filebrowser": [["kill", "filebrowser-boneage"]],
        "kill-setup": [["kill", "setup-boneage"]],
        "connect-training": [["exec", "training-boneage", "--", "bash"]],
        "logs-training": [["logs", "training-boneage"]],
        "ps": [["ps", "--tag", TAG]],
    }
    for target, calls in expected.items():
        fake.make(target)
        assert fake.calls() == calls, target


def test_kill_targets_tolerate_missing_jobs(fake):
    for target in ("kill-training", "kill-jupyter", "kill-tensorboard", "kill-filebrowser"):
        proc = fake.make(target, check=False, FAKE_APOLO_FAIL="kill")
        assert proc.returncode == 0, (target, proc.stderr)


def test_kill_terminates_every_job_with_the_project_tag(fake):
    proc = fake.make("kill", FAKE_APOLO_PS_IDS="job-aaa job-bbb")
    assert fake.calls() == [["-q", "ps", "--tag", TAG], ["kill", "job-aaa", "job-bbb"]]
    assert "job-aaa" in proc.stdout

    proc = fake.make("kill", FAKE_APOLO_PS_IDS="")
    assert fake.calls() == [["-q", "ps", "--tag", TAG]]
    assert "No running or pending jobs" in proc.stdout

    proc = fake.make("kill", check=False, FAKE_APOLO_FAIL="ps", FAKE_APOLO_PS_IDS="job-aaa")
    assert proc.returncode != 0 and fake.calls() == [["-q", "ps", "--tag", TAG]]


def test_neuro_is_an_alias(fake):
    fake.make("kill-training", "APOLO=neuro")
    assert [(r["prog"], r["argv"]) for r in fake.records()] == [("neuro", ["kill", "training-boneage"])]


# --------------------------------------------------------------------------------------
# Every flag against the installed apolo CLI
# --------------------------------------------------------------------------------------

def _cli_root():
    try:
        from apolo_cli.main import cli
    except Exception as exc:  # pragma: no cover - depends on the [platform] extra
        pytest.skip(f"apolo_cli is not importable ({exc}); pip install -e '.[platform]'")
    return cli


def _fake_sdk_parser():
    from yarl import URL
    from apolo_sdk._parser import Parser

    cluster = types.SimpleNamespace(name="default", registry_url=URL("https://registry.example.org"))
    config = types.SimpleNamespace(
        project_name_or_raise="myproj", project_name="myproj", cluster_name="default",
        org_name=None, username="alice", clusters={"default": cluster},
    )
    return config, Parser._create(config)


def _options(cmd, ctx) -> dict[str, object]:
    import click

    table: dict[str, object] = {}
    for p in cmd.get_params(ctx):
        if isinstance(p, click.Option):
            for name in (*p.opts, *p.secondary_opts):
                table[name] = p
    return table


def _takes_value(opt) -> bool:
    return not (opt.is_flag or getattr(opt, "count", False))


def validate_apolo_call(argv: list[str]) -> list[str]:
    """Check one apolo argv against the CLI's click definitions.

    Returns the resolved command path (e.g. ['job', 'save']); raises AssertionError naming the
    problem for an unknown subcommand, an undeclared/hidden/deprecated option, a global option
    after the subcommand, a bad value, or a run/exec command not separated by `--`.
    """
    import click
    from apolo_cli.click_types import JobNameType
    from apolo_cli.parse_utils import parse_timedelta

    root = _cli_root()
    _, sdk = _fake_sdk_parser()

    def check_option(cmd_name, opts, token, value_iter):
        name, eq, inline = token.partition("=")
        assert name in opts, f"`apolo {cmd_name}` has no option {name!r}"
        opt = opts[name]
        assert not getattr(opt, "hidden", False), f"`apolo {cmd_name} {name}` is hidden (deprecated)"
        assert not getattr(opt, "deprecated", False), f"`apolo {cmd_name} {name}` is deprecated"
        if not _takes_value(opt):
            assert not eq, f"`apolo {cmd_name} {name}` is a flag, got a value"
            return
        value = inline if eq else next(value_iter, None)
        assert value is not None, f"`apolo {cmd_name} {name}` needs a value"
        t = opt.type
        try:
            if isinstance(t, (click.Choice, click.types.IntParamType, click.types.FloatParamType, JobNameType)):
                t.convert(value, opt, None)
            if opt.name == "volume":
                sdk.volume(value)
            if opt.name in ("life_span", "schedule_timeout"):
                parse_timedelta(value)
            if opt.name == "env":
                assert re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", value), value
        except (click.ClickException, ValueError) as exc:
            raise AssertionError(f"`apolo {cmd_name} {name} {value}`: {exc}") from exc

    ctx = click.Context(root, info_name="apolo")
    tokens = iter(argv)
    root_opts = _options(root, ctx)
    cmd = root
    path: list[str] = []
    for token in tokens:
        if token.startswith("-"):
            check_option("", root_opts, token, tokens)
            continue
        sub = root.get_command(ctx, token)
        assert sub is not None, f"apolo has no command {token!r}"
        path.append(token)
        cmd = sub
        break
    else:
        raise AssertionError(f"no subcommand in {argv}")

    while isinstance(cmd, click.Group):
        ctx = click.Context(cmd, parent=ctx, info_name=path[-1])
        token = next(tokens, None)
        assert token is not None and not token.startswith("-"), f"`apolo {' '.join(path)}` needs a subcommand"
        sub = cmd.get_command(ctx, token)
        assert sub is not None, f"`apolo {' '.join(path)}` has no subcommand {token!r}"
        assert not getattr(sub, "hidden", False), f"`apolo {' '.join(path)} {token}` is hidden"
        path.append(token)
        cmd = sub

    ctx = click.Context(cmd, parent=ctx, info_name=path[-1])
    opts = _options(cmd, ctx)
    cmd_name = " ".join(path)
    interspersed = cmd.context_settings.get("allow_interspersed_args", True)
    positionals: list[str] = []
    job_cmd: list[str] | None = None
    for token in tokens:
        if token == "--":
            job_cmd = list(tokens)
            break
        if token.startswith("-") and (interspersed or not positionals):
            check_option(cmd_name, opts, token, tokens)
        else:
            positionals.append(token)

    if path in (["run"], ["job", "run"], ["exec"], ["job", "exec"]):
        assert job_cmd, f"`apolo {cmd_name}`: the job command must follow `--`: {argv}"
        assert len(positionals) == 1, f"`apolo {cmd_name}` takes one IMAGE/JOB before `--`, got {positionals}"
        if path[-1] == "run":
            try:
                sdk.remote_image(positionals[0])
            except ValueError as exc:
                raise AssertionError(f"bad image {positionals[0]!r}: {exc}") from exc
    else:
        assert job_cmd is None, f"`apolo {cmd_name}` takes no `--` command"
        arguments = [p for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
        fixed = sum(a.nargs for a in arguments if a.nargs > 0)
        variadic = any(a.nargs < 0 for a in arguments)
        required = sum(max(a.nargs, 1) for a in arguments if a.required)
        assert len(positionals) >= required, (
            f"`apolo {cmd_name}` needs {required} arguments, got {positionals}")
        assert variadic or len(positionals) <= fixed, f"`apolo {cmd_name}` takes {fixed} arguments, got {positionals}"
    return path


PLATFORM_TARGETS = [
    ("setup",), ("training",), ("training-ddp",), ("jupyter",), ("tensorboard",), ("filebrowser",),
    ("upload-code",), ("upload-notebooks",), ("download-notebooks",), ("download-results",),
    ("clean-code",), ("clean-data",), ("clean-notebooks",), ("clean-results",), ("kill-training",),
    ("kill-training-ddp",), ("kill-jupyter",), ("kill-tensorboard",), ("kill-filebrowser",),
    ("kill-setup",), ("connect-training",), ("logs-training",), ("ps",), ("kill",),
    ("jupyter", "HTTP_AUTH=--no-http-auth"),
]


def test_every_flag_the_makefile_passes_exists_in_the_apolo_cli(fake, tmp_path):
    _cli_root()
    (tmp_path / "d").mkdir()
    seen: set[tuple[str, ...]] = set()
    for args in [*PLATFORM_TARGETS, ("upload-data", f"DATA_DIR={tmp_path / 'd'}")]:
        fake.make(*args, FAKE_APOLO_PS_IDS="job-1")
        calls = fake.calls()
        assert calls, args
        for call in calls:
            seen.add(tuple(validate_apolo_call(call)))
    assert {("run",), ("exec",), ("cp",), ("mkdir",), ("rm",), ("kill",), ("ps",), ("logs",),
            ("job", "save")} <= seen


@pytest.mark.parametrize("argv, problem", [
    (["exec", "--no-tty", "--no-key-check", "job-1", "--", "bash"], "no option '--no-key-check'"),
    (["run", "--preset", "gpu-small", "--http", "8888", "image:boneage", "--", "x"], "hidden"),
    (["run", "--preset", "gpu-small", "--restart", "sometimes", "image:boneage", "--", "x"], "sometimes"),
    (["run", "--volume", "storage:boneage/src:/boneage/src:RO", "image:boneage", "--", "x"], "ReadWrite"),
    (["run", "--name", "Training_Job", "image:boneage", "--", "x"], "Invalid job name"),
    (["run", "--life-span", "forever", "image:boneage", "--", "x"], "forever"),
    (["run", "image:boneage", "boneage", "train"], "must follow `--`"),
    (["exec", "job-1", "bash"], "must follow `--`"),
    (["exec", "job-1", "bash", "--", "-c", "ls"], "IMAGE/JOB before `--`"),
    (["ps", "-q"], "no option '-q'"),  # global options go before the subcommand
    (["job", "sav", "job-1", "image:x"], "no subcommand 'sav'"),
    (["cp", "--recursiv", "src", "storage:x"], "no option '--recursiv'"),
    (["storage", "cp", "-r", "src", "storage:x", "--", "x"], "takes no `--`"),
    (["kill"], "needs 1 arguments"),
])
def test_validator_rejects_wrong_calls(argv, problem):
    _cli_root()
    with pytest.raises(AssertionError, match=re.escape(problem)):
        validate_apolo_call(argv)


def test_validator_accepts_documented_forms():
    _cli_root()
    assert validate_apolo_call(["-q", "ps", "--tag", "project:x"]) == ["ps"]
    assert validate_apolo_call(["--network-timeout", "300", "job", "save", "j", "image:x"]) == ["job", "save"]
    assert validate_apolo_call(["run", "-s", "cpu-small", "--http-port=80", "ubuntu", "--", "ls", "-l"]) == ["run"]
    assert validate_apolo_call(["exec", "-T", "job-1", "--", "ls"]) == ["exec"]


# --------------------------------------------------------------------------------------
# .apolo/live.yml through apolo-flow
# --------------------------------------------------------------------------------------

def _import_flow():
    try:
        from apolo_flow.parser import ConfigDir, parse_live
    except Exception as exc:  # pragma: no cover - depends on the [platform] extra
        pytest.skip(f"apolo_flow is not importable ({exc})")
    return ConfigDir, parse_live


def test_live_yml_parses_with_apolo_flow():
    _ConfigDir, parse_live = _import_flow()
    flow = parse_live(ROOT, LIVE_YML)
    assert flow.kind.value == "live"
    assert {"train", "jupyter", "tensorboard", "filebrowser"} <= set(flow.jobs)


def test_live_yml_structure():
    import yaml

    data = yaml.safe_load(LIVE_YML.read_text())
    assert data["kind"] == "live"
    assert data["images"]["boneage"]["ref"] == IMAGE
    vols = data["volumes"]
    assert vols["code"]["read_only"] is True and vols["data"]["read_only"] is True
    assert not vols["results"].get("read_only") and not vols["notebooks"].get("read_only")
    assert data["jobs"]["train"]["restart"] == "on-failure"
    assert "--resume" in data["jobs"]["train"]["cmd"]


def _flow_dry_run(params: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """The `apolo ...` commands `apolo-flow --dry-run run JOB` prints, evaluated offline."""
    ConfigDir, _ = _import_flow()
    try:
        from apolo_flow.live_runner import LiveRunner
        from rich.console import Console
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"apolo_flow internals changed ({exc})")
    config, sdk = _fake_sdk_parser()
    client = types.SimpleNamespace(config=config, parse=sdk)
    console_out = io.StringIO()
    console = Console(file=console_out, width=100_000, soft_wrap=True, color_system=None)

    async def run_all() -> dict[str, list[str]]:
        runner = LiveRunner(
            ConfigDir(ROOT, ROOT / ".apolo"), console, client, storage=None,
            global_options=types.SimpleNamespace(verbosity=0, show_traceback=False), dry_run=True,
        )
        result: dict[str, list[str]] = {}
        try:
            await runner.init_flow()
            for job_id, job_params in params.items():
                console_out.seek(0)
                console_out.truncate()
                uploads = io.StringIO()
                with contextlib.redirect_stdout(uploads):
                    await runner.run(job_id, None, job_params)
                lines = [ln for ln in console_out.getvalue().splitlines() if ln.strip()]
                assert len(lines) == 1, lines
                result[job_id] = shlex.split(lines[0])
                result[f"{job_id}:uploads"] = uploads.getvalue().splitlines()
        finally:
            await runner.close()
        return result

    return asyncio.run(run_all())


def _run_parts(argv: list[str]) -> dict[str, object]:
    """Normalise an `apolo run` argv: canonical option name -> sorted values; image; command."""
    import click

    root = _cli_root()
    ctx = click.Context(root)
    run = root.get_command(ctx, "run")
    opts = _options(run, click.Context(run, parent=ctx))
    parts: dict[str, object] = {}
    it = iter(argv[1:])
    for token in it:
        if token == "--":
            parts["command"] = list(it)
            break
        if token.startswith("-"):
            name, eq, inline = token.partition("=")
            opt = opts[name]
            if _takes_value(opt):
                value = inline if eq else next(it)
            else:
                value = name.lstrip("-")
            parts.setdefault(opt.name, []).append(value)
        else:
            parts["image"] = token
    for k, v in parts.items():
        if isinstance(v, list) and k != "command":
            parts[k] = sorted(v)
    return parts


def test_live_yml_jobs_use_only_real_apolo_options_and_match_the_makefile(fake):
    runs = _flow_dry_run({
        "train": {}, "train_ddp": {}, "jupyter": {}, "tensorboard": {}, "filebrowser": {},
    })
    pairs = {"train": ("training",), "train_ddp": ("training-ddp",), "jupyter": ("jupyter",),
             "tensorboard": ("tensorboard",), "filebrowser": ("filebrowser",)}
    for job_id, make_args in pairs.items():
        flow_call = runs[job_id]
        assert flow_call[0] == "apolo"
        assert validate_apolo_call(flow_call[1:]) == ["run"]
        fake.make(*make_args)
        make_call = _run_call(fake.calls())
        flow_parts, make_parts = _run_parts(flow_call[1:]), _run_parts(make_call)
        for key in ("preset", "volume", "env", "workdir", "http_port", "http_auth", "browse",
                    "detach", "restart", "image", "command"):
            assert flow_parts.get(key) == make_parts.get(key), (job_id, key)
        assert TAG in flow_parts["tag"]
        from apolo_cli.parse_utils import parse_timedelta
        if "life_span" in make_parts:
            assert [parse_timedelta(v) for v in flow_parts["life_span"]] == \
                [parse_timedelta(v) for v in make_parts["life_span"]], job_id
    # Code (and notebooks for jupyter) are uploaded before the job starts, as in the Makefile.
    assert any("cp --recursive --update --no-target-directory" in ln and ln.endswith("storage:boneage/src")
               for ln in runs["train:uploads"])
    assert any(ln.endswith("storage:boneage/notebooks") for ln in runs["jupyter:uploads"])


def test_live_yml_train_params(fake):
    runs = _flow_dry_run({"train": {"config": "resnet50", "extra": "train.epochs=3"}})
    cmd = runs["train"][runs["train"].index("--") + 1:]
    assert cmd == ["boneage", "train", "--config", "resnet50", "--images", "/boneage/data/images",
                   "--labels", "/boneage/data/labels.csv", "--out", "/boneage/results/resnet50",
                   "--resume", "train.epochs=3"]


# --------------------------------------------------------------------------------------
# help, variables, local targets
# --------------------------------------------------------------------------------------

def test_every_target_has_a_description_and_is_phony():
    rules = makefile_rules()
    assert REQUIRED_TARGETS <= set(rules), REQUIRED_TARGETS - set(rules)
    undocumented = sorted(t for t, d in rules.items() if not d)
    assert not undocumented, f"targets without a '## description': {undocumented}"
    assert set(rules) <= makefile_phony(), set(rules) - makefile_phony()


def test_rule_parser_detects_a_target_without_description(tmp_path, monkeypatch):
    broken = tmp_path / "Makefile"
    broken.write_text(MAKEFILE.read_text() + "\n.PHONY: sneaky\nsneaky: training\n\techo hi\n")
    monkeypatch.setattr(sys.modules[__name__], "MAKEFILE", broken)
    assert makefile_rules()["sneaky"] is None


def test_make_help_lists_every_target_with_its_description(fake):
    out = fake.make("help").stdout
    listed = {}
    for line in out.splitlines():
        m = re.match(r"^  (\S+)\s+(.+)$", line)
        if m:
            listed[m.group(1)] = m.group(2).strip()
    assert listed == makefile_rules()
    # `make` alone prints the help too.
    assert fake.make().stdout == out


def test_user_variables_use_conditional_assignment_and_are_documented():
    lines = _makefile_lines()
    doc = PLATFORM_DOC.read_text(encoding="utf-8")
    user_vars = makefile_user_vars()
    for required in ("APOLO", "PROJECT", "BASE_IMAGE", "CUSTOM_ENV", "HTTP_AUTH", "CONFIG", "DATA_DIR",
                     "TRAIN_EXTRA", "TRAINING_PRESET", "DDP_PRESET", "DDP_GPUS", "TRAINING_JOB",
                     "JUPYTER_JOB", "PROJECT_STORAGE", "DEMO_DIR", "DEMO_TRAIN_EXTRA"):
        assert required in user_vars, required
    for i, line in enumerate(lines):
        m = ANY_ASSIGN_RE.match(line)
        if not m:
            continue
        name = m.group(1)
        if USER_VAR_RE.match(line):
            assert lines[i - 1].startswith("#"), f"{name} has no comment line above it"
            assert "#" not in line.split("?=", 1)[1], f"{name}: a trailing comment would end up in the value"
            assert re.search(rf"^\|\s*`{name}`\s*\|", doc, re.M), f"{name} is missing from docs/platform.md"
        else:
            assert name.startswith(("_", ".")), f"{name} is not overridable with ?= (internal names start with _)"


def test_train_local_shows_overridden_values(fake):
    out = fake.make("-n", "train-local", "CONFIG=resnet50", "DATA_DIR=/x").stdout
    cmd = shlex.split(out.replace("\\\n", " "))
    assert cmd == ["boneage", "train", "--config", "resnet50", "--images", "/x/images",
                   "--labels", "/x/labels.csv", "--out", "results/resnet50", "--resume"]
    out = fake.make("-n", "train-local", "TRAIN_EXTRA=train.epochs=2 --engine cpu", "RESULTS_DIR=/r").stdout
    tail = shlex.split(out.replace("\\\n", " "))[-6:]
    assert tail == ["--out", "/r/paper-m46", "--resume", "train.epochs=2", "--engine", "cpu"]


def _dry(fake, *args: str) -> list[list[str]]:
    out = fake.make("-n", *args).stdout.replace("\\\n", " ")
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_demo_commands(fake):
    cmds = [c for c in _dry(fake, "demo", "DEMO_DIR=/tmp/d") if c[0] != "echo"]
    assert cmds[0] == ["rm", "-rf", "/tmp/d/run", "/tmp/d/eval", "/tmp/d/reports", "/tmp/d/summary.json"]
    assert cmds[2:6] == [
        ["boneage", "synth", "--out", "/tmp/d/phantoms", "--n", "320", "--seed", "0"],
        ["boneage", "synth", "--out", "/tmp/d/holdout", "--n", "$((", "320", "/", "4", "))", "--seed", "1"],
        ["boneage", "train", "--config", "cpu-small", "--images", "/tmp/d/phantoms/images",
         "--labels", "/tmp/d/phantoms/labels.csv", "--out", "/tmp/d/run",
         "train.epochs=24", "preprocess.size=96", "data.val_fraction=0.2"],
        ["boneage", "evaluate", "--checkpoint", "/tmp/d/run/best.pt", "--images", "/tmp/d/holdout/images",
         "--labels", "/tmp/d/holdout/labels.csv", "--out", "/tmp/d/eval"],
    ]
    # The featured held-out phantom is predicted with ITS drawn age and sex, read from holdout/labels.csv ...
    predict = next(c for c in cmds if "predict" in c)
    assert any(arg.startswith("/tmp/d/holdout/labels.csv") for arg in predict)
    tail = predict[predict.index("boneage"):]
    assert tail == ["boneage", "predict", "/tmp/d/holdout/images/100000.png", "--checkpoint", "/tmp/d/run/best.pt",
                    "--sex", "$2", "--chronological-age", "${1}m", "--out", "/tmp/d/reports"]
    # ... and the closing line (summary.json too) comes from the held-out evaluation and that report.
    assert cmds[-1][:2] == ["python", "-c"]
    assert cmds[-1][-4:] == ["/tmp/d", "100000", "320", "train.epochs=24 preprocess.size=96 data.val_fraction=0.2"]
    featured = [c[c.index("predict") + 1] for c in _dry(fake, "demo", "DEMO_FEATURED=100007") if "predict" in c]
    assert featured == ["runs/demo/holdout/images/100007.png"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_features_a_held_out_phantom(tmp_path):
    """`make demo` for real, shrunk: the featured phantom is reported at its drawn age, next to the held-out MAE."""
    from boneage.clinical import format_age

    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in set(makefile_user_vars()) and "MAKE" not in k}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", BONEAGE_CACHE_DIR=str(tmp_path / "cache"))
    demo = tmp_path / "demo"
    proc = subprocess.run(
        ["make", "--no-print-directory", "demo", f"PYTHON={sys.executable}", f"BONEAGE={bin_dir / 'boneage'}",
         f"DEMO_DIR={demo}", "DEMO_N=40", "DEMO_TRAIN_EXTRA=train.epochs=1 preprocess.size=64 "
         "data.val_fraction=0.25 train.num_threads=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Epoch (train)" not in out + proc.stderr and "requires_grad" not in proc.stderr  # one line per epoch
    assert len([ln for ln in out.splitlines() if ln.startswith("epoch 1/1 ")]) == 1
    summary = json.loads((demo / "summary.json").read_text())
    labels = (demo / "holdout" / "labels.csv").read_text().splitlines()
    row = dict(zip(labels[0].split(","), next(ln for ln in labels if ln.startswith("100000,")).split(",")))
    assert summary["featured"]["drawn_months"] == float(row["boneage"])
    report = json.loads((demo / "reports" / "100000.json").read_text())
    assert report["chronological_age_months"] == float(row["boneage"])  # no made-up chronological age
    assert report["sex"] == ("M" if row["male"] == "True" else "F")
    (featured,) = [ln for ln in out.splitlines() if ln.startswith("featured: ")]
    assert f"drawn at {format_age(float(row['boneage']))}" in featured
    assert f"estimate {format_age(report['bone_age_months'])}" in featured
    assert f"held-out phantom MAE is {summary['heldout_mae_months']:.1f} months over 10 phantoms" in featured
    assert summary["settings"]["DEMO_N"] == 40 and summary["n_heldout"] == 10


def test_local_targets_commands(fake):
    def dry(*args: str) -> list[list[str]]:
        return _dry(fake, *args)

    # test and lint first install the [dev] tools, pinned, into the environment PYTHON belongs to (once: a stamp)
    py = "/opt/py/bin/python"
    assert dry("test", f"PYTHON={py}") == [
        [py, "-m", "pip", "install", "-c", "requirements-dev.txt", "-e", ".[dev]"],
        ["mkdir", "-p", ".make", "&&", "touch", ".make/setup-dev_opt_py_bin_python.stamp"],
        [py, "-m", "pytest", "-q"],
    ]
    assert dry("lint", f"PYTHON={py}")[-2:] == [[py, "-m", "flake8", "src", "tests"], [py, "-m", "mypy", "src"]]
    assert dry("test", f"PYTHON={py}", "CONSTRAINTS=")[0] == [py, "-m", "pip", "install", "-e", ".[dev]"]
    assert dry("bench") == [["python", "-m", "benchmarks.run"]]
    assert dry("bench-quick") == [["python", "-m", "benchmarks.run", "--quick"]]
    assert dry("bench-serve") == [["python", "-m", "benchmarks.serve_load"]]
    nb = dry("notebook-html")
    assert nb[0][:3] == ["python", "-m", "nbconvert"] and "--execute" in nb[0]
    assert nb[0][-1] == "notebooks/demo.ipynb"
    assert nb[0][nb[0].index("--output-dir") + 1] == "runs/notebook"
    assert nb[0][nb[0].index("--output") + 1] == "demo"
    # setup-local: torch first, on its own, then everything else at the pinned versions
    assert dry("setup-local")[-2:] == [
        ["python", "-m", "pip", "install", "torch==2.14.1", "torchvision==0.29.1"],
        ["python", "-m", "pip", "install", "-c", "requirements-dev.txt", "-e", ".[all]"],
    ]
    cpu = "--index-url https://download.pytorch.org/whl/cpu"
    assert dry("setup-local", f"TORCH_PIP_OPTIONS={cpu}")[-2][:6] == \
        ["python", "-m", "pip", "install", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert dry("tensorboard-local", "RESULTS_DIR=/r") == [["tensorboard", "--logdir=/r", "--port=6006"]]
    assert dry("jupyter-local")[0][:3] == ["python", "-m", "jupyterlab"]
    lock = fake.make("-n", "lock-dev").stdout
    assert "python -m pip freeze --exclude-editable" in lock and "requirements-dev.txt" in lock
    # No local target calls the platform.
    assert fake.calls() == []


def test_clean_local_keeps_results_and_data(fake, tmp_path):
    out = fake.make("-n", "clean-local").stdout
    assert "rm -rf runs/demo runs/notebook" in out and " .make" in out
    assert "results" not in out and " data" not in out


# --------------------------------------------------------------------------------------
# Image inputs: requirements.txt, apt.txt, and what `make setup` builds the package from
# --------------------------------------------------------------------------------------

def _requirements(lines) -> dict[str, str]:
    from packaging.requirements import Requirement

    reqs = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            assert not line.startswith("-"), f"requirements.txt: no pip options/editables ({line})"
            r = Requirement(line)
            reqs[r.name.lower()] = str(r.specifier)
    return reqs


def test_requirements_mirror_pyproject_dependencies():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main = _requirements(project["dependencies"])
    image = _requirements((ROOT / "requirements.txt").read_text().splitlines())
    for name, spec in main.items():
        assert name in image, f"requirements.txt lacks {name}"
        assert image[name] == spec, f"{name}: requirements.txt {image[name]!r} != pyproject {spec!r}"
    # Extras the jobs need: DICOM reading and the Jupyter job.
    for extra in ("dicom",):
        for name, spec in _requirements(project["optional-dependencies"][extra]).items():
            assert image.get(name) == spec, name
    assert "jupyterlab" in image and "boneage" not in image


def test_apt_txt_lists_package_names():
    names = [ln.strip() for ln in (ROOT / "apt.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert names
    for name in names:
        assert re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name), name
    # The filter `make setup` applies in the job yields the same list.
    out = subprocess.run(["sh", "-c", 'grep -v "^ *#" apt.txt | xargs'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == names


def test_setup_files_are_enough_to_build_the_package(fake, tmp_path):
    """`make setup` installs boneage from PROJECT_FILES + src: they must build a wheel with the configs."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    out = fake.make("-n", "setup").stdout
    files = re.search(r"cp --update --target-directory \S+ (.+)", out).group(1).split()
    build = tmp_path / "build"
    build.mkdir()
    for name in files:
        assert (ROOT / name).is_file(), f"make setup copies {name}, which does not exist"
        shutil.copy(ROOT / name, build / name)
    shutil.copytree(ROOT / "src", build / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(build)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("boneage-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("boneage/configs/") and n.endswith(".yaml") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "boneage = boneage.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_setup_cfg_configures_flake8_and_mypy():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg.getint("flake8", "max-line-length") == 120
    assert cfg.getboolean("mypy", "ignore_missing_imports") is True


# --------------------------------------------------------------------------------------
# The boneage commands the jobs and local targets run, against boneage's own CLI parser
# --------------------------------------------------------------------------------------

def _parse_boneage(argv: list[str]):
    cli = pytest.importorskip("boneage.cli")
    assert argv[0] == "boneage", argv
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return cli.build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            raise AssertionError(f"boneage rejects {argv}: {err.getvalue()}") from exc


def test_job_and_local_commands_parse_with_the_boneage_cli(fake):
    fake.make("training", "TRAIN_EXTRA=train.epochs=3")
    ns = _parse_boneage(_job_command(_run_call(fake.calls())))
    assert ns.resume is True and ns.config == "paper-m46"
    fake.make("training-ddp", "DDP_GPUS=8")
    ns = _parse_boneage(_job_command(_run_call(fake.calls())))
    assert ns.resume is True and ns.engine == "ddp" and ns.ddp_workers == 8

    out = fake.make("-n", "train-local", "demo").stdout.replace("\\\n", " ")
    parsed = 0
    for line in out.splitlines():
        line = line[line.index("boneage predict"):] if " boneage predict " in line else line
        if line.strip().startswith("boneage ") and "$((" not in line:
            _parse_boneage([a.replace("$2", "F").replace("$1", "108.0") for a in shlex.split(line)])
            parsed += 1
    assert parsed == 5  # train-local; demo's synth, train, evaluate, predict


def test_flow_train_commands_parse_with_the_boneage_cli():
    runs = _flow_dry_run({"train": {"extra": "train.epochs=3"}, "train_ddp": {}})
    for job_id in ("train", "train_ddp"):
        ns = _parse_boneage(_job_command(runs[job_id]))
        assert ns.resume is True
