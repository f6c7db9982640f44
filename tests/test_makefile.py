"""The Makefile and .apolo/live.yml, checked offline.

* The real make targets run with a fake ``apolo`` first on PATH (tests/fake_apolo/apolo.py),
  which records every call. Each recorded call is parsed against the option definitions of the
  installed apolo CLI -- its click commands, read through click's documented ``Group.get_command``,
  ``Command.params`` and ``Option.opts`` -- so a removed, renamed, hidden or misspelled flag fails
  here rather than on the platform. Values are checked with the CLI's own click types where they work
  offline (choices, numbers, job names) and with small explicit parsers of the syntax ``apolo run --help``
  documents (volumes, life spans, env), which are themselves checked against that help text.
* The tests then assert behaviour on the parsed calls -- the preset, which storage is mounted where
  and how, what reaches the job's environment, the command the job runs (parsed by boneage's own
  CLI) -- rather than whole argument lists, so reordering or respelling an equivalent flag is free.
* The Makefile is parsed: every target has a ``## description`` that ``make help`` shows,
  every target is .PHONY, every user variable is ``?=`` with a comment and a row in
  docs/platform.md (tests/test_docs.py checks the defaults, the README and .ci/run).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import csv
import importlib.util
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

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
PROJECT_FILES = {"requirements.txt", "apt.txt", "setup.cfg", "pyproject.toml", "README.md"}
REQUIRED_TARGETS = {
    "help", "setup", "upload-code", "upload-data", "upload-notebooks", "download-notebooks",
    "download-results", "clean-code", "clean-data", "clean-notebooks", "clean-results",
    "training", "training-ddp", "kill-training", "connect-training", "jupyter", "kill-jupyter",
    "tensorboard", "kill-tensorboard", "filebrowser", "kill-filebrowser", "ps", "kill",
    "setup-local", "train-local", "jupyter-local", "tensorboard-local", "test", "lint", "demo",
    "bench", "bench-quick", "bench-serve", "notebook-html", "clean-local", "docs",
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

        def parsed(self) -> list[ApoloCall]:
            """The recorded calls, each parsed (and so validated) against the real apolo CLI."""
            return [parse_apolo(argv) for argv in self.calls()]

    return Runner()


# --------------------------------------------------------------------------------------
# Explicit parsers of the value syntax `apolo run --help` documents
# (test_explicit_parsers_agree_with_the_apolo_cli_help ties them to the installed CLI)
# --------------------------------------------------------------------------------------

class VolumeSpec(NamedTuple):
    remote: str
    mount: str
    mode: str  # "ro" or "rw"


_VOLUME_RE = re.compile(r"(storage:[^:]*):(/[^:]*)(?::([^:]*))?")


def parse_volume(spec: str) -> VolumeSpec:
    """``storage:PATH:MOUNT_PATH[:ro|rw]`` (read-write when the mode is left out)."""
    m = _VOLUME_RE.fullmatch(spec)
    if not m:
        raise ValueError(f"Invalid volume specification {spec!r}: expected storage:PATH:MOUNT_PATH[:ro|rw]")
    remote, mount, mode = m.groups()
    if mode is not None and mode not in ("ro", "rw"):
        raise ValueError(f"Wrong ReadWrite/ReadOnly mode spec for {spec!r}: {mode!r} is neither ro nor rw")
    return VolumeSpec(remote, mount, mode or "rw")


_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> int:
    """``1d2h3m4s`` with any of the parts left out, in seconds; ``0`` (no limit) is 0."""
    m = _DURATION_RE.fullmatch(text)
    if text != "0" and (not text or not m):
        raise ValueError(f"{text!r} is not a duration in the format '1d2h3m4s'")
    if text == "0":
        return 0
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_env(text: str) -> tuple[str, str]:
    """``NAME=VALUE``."""
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", text, re.S)
    if not m:
        raise ValueError(f"{text!r} is not NAME=VALUE")
    return m.group(1), m.group(2)


_IMAGE_REF_RE = re.compile(
    r"(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?")


def parse_image(text: str) -> str:
    """``image:NAME[:TAG]`` (the platform registry) or a Docker Hub ``NAME[:TAG]``; returns NAME."""
    m = _IMAGE_REF_RE.fullmatch(text.removeprefix("image:"))
    if not m:
        raise ValueError(f"{text!r} is neither image:NAME[:TAG] nor a Docker image NAME[:TAG]")
    return m.group("name")


def test_explicit_parsers_agree_with_the_apolo_cli_help():
    """The syntax the parsers above accept is the syntax the installed CLI documents."""
    run = _command("run")
    opts = {p.name: p for p in run.params}
    # --volume: every storage example of `apolo run --help` parses, with its mode.
    examples = re.findall(r"--volume[= ](storage:\S+?)(?:\s|\\|$)", run.help or "")
    assert examples, "`apolo run --help` no longer shows a --volume example: recheck parse_volume"
    for example in examples:
        assert parse_volume(example).mode == example.rsplit(":", 1)[1]
    # --life-span / --schedule-timeout: the format their help names parses.
    for name in ("life_span", "schedule_timeout"):
        documented = re.findall(r"format '([^']+)'", opts[name].help or "")
        assert documented, f"`apolo run --{name.replace('_', '-')}` documents no format: recheck parse_duration"
        for example in documented:
            parse_duration(example)
    assert "'0'" in opts["life_span"].help and parse_duration("0") == 0
    assert parse_duration("1d") == 86400 and parse_duration("2h30m") == 9000 and parse_duration("86400s") == 86400
    # ... and the parsers reject what they should.
    for bad, parser in [("storage:a:/b:RO", parse_volume), ("storage:a", parse_volume), ("disk:d:/m", parse_volume),
                        ("storage:a:rel/mount:ro", parse_volume), ("forever", parse_duration), ("1h1d", parse_duration),
                        ("", parse_duration), ("1X=2", parse_env), ("PATH", parse_env),
                        ("image:Boneage", parse_image), ("image:boneage:", parse_image), ("a b", parse_image)]:
        with pytest.raises(ValueError):
            parser(bad)
    assert parse_image("image:boneage:latest") == "boneage" and parse_image("filebrowser/filebrowser") \
        == "filebrowser/filebrowser"


# --------------------------------------------------------------------------------------
# The installed apolo CLI: its click commands, through click's documented API
# --------------------------------------------------------------------------------------

def _cli_root():
    try:
        from apolo_cli.main import cli  # the click group behind the `apolo` console script
    except Exception as exc:  # pragma: no cover - depends on the [platform] extra
        pytest.skip(f"apolo_cli is not importable ({exc}); pip install -e '.[platform]'")
    return cli


def _command(*path: str):
    import click

    cmd = _cli_root()
    ctx = click.Context(cmd, info_name="apolo")
    for name in path:
        cmd = cmd.get_command(ctx, name)
        assert cmd is not None, f"apolo has no command {' '.join(path)!r}"
        ctx = click.Context(cmd, parent=ctx, info_name=name)
    return cmd


def _option_table(cmd) -> dict[str, tuple[object, str, bool]]:
    """Every option string of ``cmd`` -> (click.Option, canonical key, the value it means as a flag).

    The key is the option's first long name, so ``-s`` and ``--preset`` are both ``--preset``;
    the secondary name of an on/off flag (``--no-http-auth``) maps to the primary one with False.
    """
    import click

    table: dict[str, tuple[object, str, bool]] = {}
    for p in cmd.params:
        if isinstance(p, click.Option):
            key = next((o for o in p.opts if o.startswith("--")), p.opts[0])
            table.update({o: (p, key, True) for o in p.opts})
            table.update({o: (p, key, False) for o in p.secondary_opts})
    return table


def _takes_value(opt) -> bool:
    return not (opt.is_flag or getattr(opt, "count", False))


@dataclass
class ApoloCall:
    """One `apolo` invocation, parsed with the real CLI's option definitions."""

    argv: list[str]
    path: tuple[str, ...]
    global_options: dict[str, list]
    options: dict[str, list]
    positionals: list[str]
    command: list[str] | None

    def values(self, key: str) -> list:
        return self.options.get(key, [])

    def value(self, key: str):
        values = self.values(key)
        assert len(values) == 1, f"`apolo {' '.join(self.path)}`: expected one {key}, got {values}: {self.argv}"
        return values[0]

    def flag(self, key: str) -> bool | None:
        """The flag's last setting (True/False), None when it is not given."""
        values = self.values(key)
        return values[-1] if values else None

    def volumes(self) -> dict[str, VolumeSpec]:
        """mount path -> volume."""
        vols = [parse_volume(v) for v in self.values("--volume")]
        mounts = [v.mount for v in vols]
        assert len(set(mounts)) == len(mounts), f"two volumes on one mount path: {mounts}"
        return {v.mount: v for v in vols}

    def env(self) -> dict[str, str]:
        return dict(parse_env(v) for v in self.values("--env"))

    @property
    def image(self) -> str:
        assert self.path[-1] == "run", self.path
        return self.positionals[0]


def parse_apolo(argv: list[str]) -> ApoloCall:
    """Parse one apolo argv against the CLI's click definitions.

    Raises AssertionError naming the problem: an unknown or hidden subcommand, an undeclared, hidden
    or deprecated option, a global option after the subcommand, a flag given a value or an option
    without one, a value the option rejects, the wrong number of arguments, or a run/exec
    command not separated by ``--``.
    """
    import click

    root = _cli_root()
    ctx = click.Context(root, info_name="apolo")
    path: list[str] = []
    global_options: dict[str, list] = {}
    options: dict[str, list] = {}

    def take_option(cmd, store: dict[str, list], i: int) -> int:
        label = " ".join(["apolo", *path])
        name, eq, inline = argv[i].partition("=")
        table = _option_table(cmd)
        assert name in table, f"`{label}` has no option {name!r}"
        opt, key, flag_value = table[name]
        assert not getattr(opt, "hidden", False), f"`{label} {name}` is hidden (deprecated)"
        assert not getattr(opt, "deprecated", False), f"`{label} {name}` is deprecated"
        if not _takes_value(opt):
            assert not eq, f"`{label} {name}` is a flag, got a value"
            store.setdefault(key, []).append(flag_value)
            return i + 1
        if eq:
            value, i = inline, i + 1
        else:
            assert i + 1 < len(argv), f"`{label} {name}` needs a value"
            value, i = argv[i + 1], i + 2
        try:
            if isinstance(opt.type, (click.Choice, click.types.IntParamType, click.types.FloatParamType)):
                opt.type.convert(value, opt, None)
            if path[-1:] == ["run"] and key == "--name":
                opt.type.convert(value, opt, None)  # the CLI's own job-name rule
            if key == "--volume":
                parse_volume(value)
            if key in ("--life-span", "--schedule-timeout"):
                parse_duration(value)
            if key == "--env":
                parse_env(value)
        except (click.ClickException, ValueError) as exc:
            raise AssertionError(f"`{label} {name} {value}`: {exc}") from exc
        store.setdefault(key, []).append(value)
        return i

    i = 0
    cmd = root
    while True:
        assert i < len(argv), f"no subcommand in {argv}"
        if argv[i].startswith("-"):
            i = take_option(root, global_options, i)
            continue
        break
    while isinstance(cmd, click.Group):
        label = " ".join(["apolo", *path])
        assert i < len(argv) and not argv[i].startswith("-"), f"`{label}` needs a subcommand"
        sub = cmd.get_command(ctx, argv[i])
        assert sub is not None, f"`{label}` has no {'command' if cmd is root else 'subcommand'} {argv[i]!r}"
        assert not getattr(sub, "hidden", False), f"`{label} {argv[i]}` is hidden"
        path.append(argv[i])
        cmd, i = sub, i + 1
        ctx = click.Context(cmd, parent=ctx, info_name=path[-1])

    cmd_name = " ".join(path)
    interspersed = cmd.context_settings.get("allow_interspersed_args", True)
    positionals: list[str] = []
    job_cmd: list[str] | None = None
    while i < len(argv):
        token = argv[i]
        if token == "--":
            job_cmd = argv[i + 1:]
            break
        if token.startswith("-") and (interspersed or not positionals):
            i = take_option(cmd, options, i)
        else:
            positionals.append(token)
            i += 1

    if path[-1] in ("run", "exec"):
        assert job_cmd, f"`apolo {cmd_name}`: the job command must follow `--`: {argv}"
        assert len(positionals) == 1, f"`apolo {cmd_name}` takes one IMAGE/JOB before `--`, got {positionals}"
    else:
        assert job_cmd is None, f"`apolo {cmd_name}` takes no `--` command"
        arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
        fixed = sum(a.nargs for a in arguments if a.nargs > 0)
        variadic = any(a.nargs < 0 for a in arguments)
        required = sum(max(a.nargs, 1) for a in arguments if a.required)
        assert len(positionals) >= required, f"`apolo {cmd_name}` needs {required} arguments, got {positionals}"
        assert variadic or len(positionals) <= fixed, f"`apolo {cmd_name}` takes {fixed} arguments, got {positionals}"
    images = positionals[:1] if path[-1] == "run" else positionals[1:2] if path == ["job", "save"] else []
    for image in images:
        try:
            parse_image(image)
        except ValueError as exc:
            raise AssertionError(f"`apolo {cmd_name}`: bad image: {exc}") from exc
    if path == ["job", "save"]:
        assert positionals[1].startswith("image:"), f"`apolo job save` saves to the platform registry: {argv}"
    return ApoloCall(list(argv), tuple(path), global_options, options, positionals, job_cmd)


@pytest.mark.parametrize("argv, problem", [
    (["exec", "--no-tty", "--no-key-check", "job-1", "--", "bash"], "no option '--no-key-check'"),
    (["run", "--preset", "gpu-small", "--http", "8888", "image:boneage", "--", "x"], "hidden"),
    (["run", "--preset", "gpu-small", "--restart", "sometimes", "image:boneage", "--", "x"], "sometimes"),
    (["run", "--http-port", "eighty", "image:boneage", "--", "x"], "eighty"),
    (["run", "--preset"], "needs a value"),
    (["run", "--detach=yes", "image:boneage", "--", "x"], "is a flag"),
    (["run", "--volume", "storage:boneage/src:/boneage/src:RO", "image:boneage", "--", "x"], "ReadWrite"),
    (["run", "--volume", "storage:boneage/src", "image:boneage", "--", "x"], "storage:PATH:MOUNT_PATH"),
    (["run", "--env", "PYTHONPATH", "image:boneage", "--", "x"], "NAME=VALUE"),
    (["run", "--name", "Training_Job", "image:boneage", "--", "x"], "Invalid job name"),
    (["run", "--life-span", "forever", "image:boneage", "--", "x"], "forever"),
    (["run", "Image:Boneage", "--", "x"], "bad image"),
    (["run", "image:boneage", "boneage", "train"], "must follow `--`"),
    (["exec", "job-1", "bash"], "must follow `--`"),
    (["exec", "job-1", "bash", "--", "-c", "ls"], "IMAGE/JOB before `--`"),
    (["ps", "-q"], "no option '-q'"),  # global options go before the subcommand
    (["--network-timeout", "soon", "ps"], "soon"),
    (["job", "sav", "job-1", "image:x"], "no subcommand 'sav'"),
    (["job", "save", "job-1", "boneage:latest"], "platform registry"),
    (["trainings"], "no command 'trainings'"),
    (["cp", "--recursiv", "src", "storage:x"], "no option '--recursiv'"),
    (["storage", "cp", "-r", "src", "storage:x", "--", "x"], "takes no `--`"),
    (["kill"], "needs 1 arguments"),
    (["logs", "job-1", "job-2"], "takes 1 arguments"),
])
def test_parser_rejects_wrong_calls(argv, problem):
    with pytest.raises(AssertionError, match=re.escape(problem)):
        parse_apolo(argv)


def test_parser_accepts_documented_forms_and_resolves_aliases():
    assert parse_apolo(["-q", "ps", "--tag", "project:x"]).global_options == {"--quiet": [True]}
    save = parse_apolo(["--network-timeout", "300", "job", "save", "j", "image:x"])
    assert save.path == ("job", "save") and save.global_options == {"--network-timeout": ["300"]}
    run = parse_apolo(["run", "-s", "cpu-small", "--http-port=80", "--no-http-auth", "-v", "storage:a:/a",
                       "ubuntu", "--", "ls", "-l"])
    assert run.value("--preset") == "cpu-small" and run.value("--http-port") == "80"
    assert run.flag("--http-auth") is False and run.flag("--browse") is None
    assert run.volumes() == {"/a": VolumeSpec("storage:a", "/a", "rw")}
    assert run.image == "ubuntu" and run.command == ["ls", "-l"]
    assert parse_apolo(["exec", "-T", "job-1", "--", "ls"]).flag("--tty") is False


def test_a_wrong_flag_or_value_from_the_makefile_is_rejected(fake):
    """The check above applies to what the Makefile really sends (here made wrong through its variables)."""
    fake.make("jupyter", "HTTP_AUTH=--http-authentication")
    with pytest.raises(AssertionError, match="no option '--http-authentication'"):
        fake.parsed()
    fake.make("training", "TRAINING_RESTART=sometimes")
    with pytest.raises(AssertionError, match="sometimes"):
        fake.parsed()
    fake.make("training", "RESULTS_MOUNT=results")
    with pytest.raises(AssertionError, match="Invalid volume specification"):
        fake.parsed()
    fake.make("training-ddp", "TRAINING_DDP_JOB=ddp_job")
    with pytest.raises(AssertionError, match="Invalid job name"):
        fake.parsed()


def test_fake_apolo_splits_global_options_like_the_real_cli():
    """The fake reads `apolo [GLOBAL OPTIONS] SUBCOMMAND ...` with the real CLI's value-taking global options."""
    spec = importlib.util.spec_from_file_location("fake_apolo", FAKE_APOLO)
    fake_apolo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_apolo)
    table = _option_table(_cli_root())
    with_value = {name for name, (opt, _key, _flag) in table.items() if _takes_value(opt)}
    assert set(fake_apolo.GLOBAL_WITH_VALUE) == with_value
    assert fake_apolo.split_global(["--network-timeout", "300", "-q", "job", "save", "-x"]) == \
        (["--network-timeout", "300", "-q"], ["job", "save", "-x"])


def test_these_tests_use_no_private_api_of_other_packages():
    """No `apolo_sdk._parser` and the like: imports of underscore modules or names, or calls of `_methods`."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
            parts = node.module.split(".") + [a.name for a in node.names]
            private += [node.module for p in parts if p.startswith("_")]
        elif isinstance(node, ast.Import):
            private += [a.name for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "fake_apolo")):
                private.append(f".{node.attr}")
    assert not private, private


# --------------------------------------------------------------------------------------
# Platform targets: what the jobs get
# --------------------------------------------------------------------------------------

def _inside(path: str, mount: str) -> bool:
    return PurePosixPath(mount) in (PurePosixPath(path), *PurePosixPath(path).parents)


def _assert_upload(mkdir: ApoloCall, cp: ApoloCall, src: str, dst: str) -> None:
    """``mkdir --parents DST`` then a recursive, incremental copy of SRC's contents into DST (not DST/SRC)."""
    assert mkdir.path == ("mkdir",) and mkdir.flag("--parents") and mkdir.positionals == [dst], mkdir.argv
    assert cp.path == ("cp",) and cp.positionals == [src, dst], cp.argv
    assert cp.flag("--recursive") and cp.flag("--update") and cp.flag("--no-target-directory"), cp.argv


def _assert_code_upload(calls: list[ApoloCall], storage: str = STORAGE) -> None:
    _assert_upload(calls[0], calls[1], "src", f"{storage}/src")
    assert {"__pycache__", "*.pyc"} <= set(calls[1].values("--exclude")), calls[1].argv


def _job(fake, target: str, *args: str, uploads: int = 2) -> tuple[ApoloCall, subprocess.CompletedProcess]:
    """Run a job target; return its one `apolo run` (after `uploads` upload calls). A training target first
    makes sure the data folder exists and runs the data check job (make check-data)."""
    proc = fake.make(target, *args)
    calls = fake.parsed()
    if target in ("training", "training-ddp"):
        assert [c.path[-1] for c in calls[uploads:]] == ["mkdir", "run", "run"], [c.argv for c in calls]
        _assert_data_check(calls[uploads + 1], calls[-1])
    else:
        assert [c.path[-1] for c in calls[uploads:]] == ["run"], [c.argv for c in calls]
    return calls[-1], proc


def _assert_data_check(check: ApoloCall, training: ApoloCall) -> None:
    """The pre-flight job: `boneage check-data` on what the training job will read, attached (make waits for its
    exit code), never restarted, on the same image, code and data volume as the training job."""
    assert check.value("--restart") == "never" and not check.flag("--detach") and check.flag("--tty") is False
    # On the training job's preset: with --gpu it also finds a GPU the training could not use, once.
    assert check.value("--preset") == training.value("--preset") and check.values("--tag") == training.values("--tag")
    assert 0 < parse_duration(check.value("--life-span")) <= 3600
    assert check.image == training.image and check.env() == training.env()
    assert check.volumes() == {k: v for k, v in training.volumes().items() if v.mode == "ro"}
    ns, train_ns = _parse_boneage(check.command), _parse_boneage(training.command)
    assert ns.command == "check-data" and (ns.images, ns.labels) == (train_ns.images, train_ns.labels)
    assert ns.gpu is (train_ns.engine in ("gpu", "ddp")), (ns, train_ns.engine)


def _parse_boneage(argv: list[str]):
    cli = pytest.importorskip("boneage.cli")
    assert argv[0] == "boneage", argv
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return cli.build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            raise AssertionError(f"boneage rejects {argv}: {err.getvalue()}") from exc


def test_setup_builds_image_in_a_job_then_saves_and_kills_it(fake):
    fake.make("setup")
    calls = fake.parsed()
    assert [c.path for c in calls] == [
        ("mkdir",), ("cp",),  # upload-code
        ("kill",), ("mkdir",), ("cp",), ("run",), ("exec",), ("exec",), ("job", "save"), ("kill",),
    ]
    _assert_code_upload(calls)
    stale_kill, mkdir, cp, run, apt, pip, save, kill = calls[2:]
    assert stale_kill.positionals == ["setup-boneage"] == kill.positionals
    assert mkdir.positionals == [STORAGE] and mkdir.flag("--parents")
    # The files the image is built from go into the project folder the setup job mounts read-only.
    assert cp.value("--target-directory") == STORAGE and set(cp.positionals) == PROJECT_FILES and cp.flag("--update")
    assert run.value("--name") == "setup-boneage" and run.value("--preset") == "cpu-small"
    assert run.flag("--detach") and run.value("--tag") == TAG
    assert 0 < parse_duration(run.value("--life-span")) <= 24 * 3600  # a safety net if setup fails half-way
    assert run.volumes() == {"/boneage": VolumeSpec(STORAGE, "/boneage", "ro")}
    assert run.image == "python:3.11-slim-bookworm" and run.command == ["sleep", "infinity"]
    for step in (apt, pip):
        assert step.positionals == ["setup-boneage"] and step.flag("--tty") is False
        assert step.command[:2] == ["bash", "-c"] and len(step.command) == 3
    assert "apt-get -qq update" in apt.command[2] and "/boneage/apt.txt" in apt.command[2]
    assert "--no-install-recommends" in apt.command[2] and "rm -rf /var/lib/apt/lists/*" in apt.command[2]
    assert "-r /boneage/requirements.txt" in pip.command[2] and "--no-deps /tmp/boneage-build" in pip.command[2]
    assert save.positionals == ["setup-boneage", IMAGE]
    assert float(save.global_options["--network-timeout"][0]) >= 60  # saving an image takes a while


def test_setup_continues_when_no_stale_setup_job_exists(fake):
    # The first kill (of a stale setup job) fails when there is none: setup must go on.
    proc = fake.make("setup", check=False, FAKE_APOLO_FAIL="kill")
    assert ("job", "save") in [c.path for c in fake.parsed()]
    assert proc.returncode != 0  # ... but the final kill failing is reported


def _assert_training_job(run: ApoloCall):
    """What every training job needs (default PROJECT); returns the parsed `boneage train` namespace."""
    assert run.flag("--detach") and run.value("--restart") == "on-failure"  # a preempted job restarts ...
    assert parse_duration(run.value("--life-span")) == 86400
    assert TAG in run.values("--tag")  # make ps / make kill find it
    vols = run.volumes()
    assert vols == {
        "/boneage/src": VolumeSpec(f"{STORAGE}/src", "/boneage/src", "ro"),
        "/boneage/data": VolumeSpec(f"{STORAGE}/data", "/boneage/data", "ro"),
        "/boneage/results": VolumeSpec(f"{STORAGE}/results", "/boneage/results", "rw"),
    }
    # The uploaded code comes first on PYTHONPATH; the job starts in the project folder.
    assert run.env() == {"PYTHONPATH": "/boneage/src"}
    assert run.value("--workdir") == "/boneage"
    ns = _parse_boneage(run.command)
    assert ns.command == "train" and ns.resume is True  # ... and continues from RUN_DIR/last.pt
    assert _inside(ns.images, "/boneage/data") and _inside(ns.labels, "/boneage/data")
    assert _inside(ns.out, "/boneage/results") and vols["/boneage/results"].mode == "rw"
    return ns


def test_training_runs_resumable_gpu_job(fake):
    run, proc = _job(fake, "training")
    _assert_code_upload(fake.parsed())
    assert run.value("--name") == "training-boneage" and run.value("--preset") == "gpu-small"
    assert run.image == IMAGE
    ns = _assert_training_job(run)
    # The best GPU config we ship, and a job that fails clearly without a usable GPU (never a silent CPU run).
    assert ns.config == "lite0-gpu" and ns.out == "/boneage/results/lite0-gpu"
    assert ns.images == "/boneage/data/images" and ns.labels == "/boneage/data/labels.csv"
    assert ns.engine == "gpu" and ns.overrides == []
    assert _parse_boneage(_job(fake, "training", "TRAINING_ENGINE=cpu")[0].command).engine == "cpu"
    assert "apolo logs training-boneage" in proc.stdout


def test_training_ddp_uses_multi_gpu_preset_and_ddp_engine(fake):
    run, proc = _job(fake, "training-ddp", "DDP_GPUS=4", "DDP_PRESET=gpu-4x")
    _assert_code_upload(fake.parsed())
    assert run.value("--name") == "training-ddp-boneage" and run.value("--preset") == "gpu-4x"
    ns = _assert_training_job(run)
    assert ns.engine == "ddp" and ns.ddp_workers == 4  # one DDP worker per GPU of the preset
    assert ns.out == "/boneage/results/lite0-gpu-ddp"  # its own run folder, apart from single-GPU runs
    assert "apolo logs training-ddp-boneage" in proc.stdout
    assert _parse_boneage(_job(fake, "training-ddp")[0].command).ddp_workers == 2


def test_training_and_training_ddp_share_one_job_definition(fake):
    """The two differ in job name, preset, run folder and the DDP options only -- also after overrides."""
    for overrides in [(), ("PROJECT=ba2", "TRAINING_LIFE_SPAN=2h", "TRAINING_RESTART=never", "CONFIG=resnet50",
                           "CUSTOM_ENV=image:other:v2", "TRAIN_EXTRA=train.epochs=3")]:
        single, _ = _job(fake, "training", *overrides)
        ddp, _ = _job(fake, "training-ddp", *overrides, "DDP_GPUS=8")
        differ = {"--name", "--preset"}
        assert {k: v for k, v in single.options.items() if k not in differ} == \
            {k: v for k, v in ddp.options.items() if k not in differ}, overrides
        assert single.image == ddp.image
        single_ns, ddp_ns = _parse_boneage(single.command), _parse_boneage(ddp.command)
        assert ddp_ns.out == single_ns.out + "-ddp"
        assert (ddp_ns.engine, ddp_ns.ddp_workers) == ("ddp", 8)
        same = {k for k in vars(single_ns) if k not in ("out", "engine", "ddp_workers", "func")}
        assert {k: getattr(single_ns, k) for k in same} == {k: getattr(ddp_ns, k) for k in same}, overrides
    # The overrides reached both (the last pair checked).
    assert single.value("--restart") == "never" and parse_duration(single.value("--life-span")) == 7200
    assert single.image == "image:other:v2" and single.volumes()["/ba2/data"].remote == "storage:ba2/data"
    assert single.env() == {"PYTHONPATH": "/ba2/src"}


def test_training_variables_are_overridable(fake):
    run, _ = _job(
        fake, "training", "CONFIG=resnet50", "TRAINING_PRESET=gpu-large", "TRAINING_RESTART=never",
        "TRAIN_EXTRA=train.epochs=3 --cache-dir /boneage/results/cache", "PROJECT=ba2",
        "IMAGES_SUBDIR=boneage-training-dataset", "LABELS_FILE=train.csv",
    )
    assert run.value("--preset") == "gpu-large" and run.value("--restart") == "never"
    assert run.value("--name") == "training-ba2" and run.image == "image:ba2:latest"
    assert run.volumes()["/ba2/data"] == VolumeSpec("storage:ba2/data", "/ba2/data", "ro")
    ns = _parse_boneage(run.command)
    assert (ns.config, ns.images, ns.labels, ns.out) == (
        "resnet50", "/ba2/data/boneage-training-dataset", "/ba2/data/train.csv", "/ba2/results/resnet50")
    assert ns.overrides == ["train.epochs=3"] and ns.cache_dir == "/boneage/results/cache"


def test_train_extra_reaches_the_job_verbatim_and_last(fake):
    """TRAIN_EXTRA is appended as given (commas too), after the Makefile's own options, so it can override them."""
    extra = ["model.name=resnet50", "train.lr_steps=10,20", "--ddp-workers", "3"]
    for target in ("training", "training-ddp"):
        run, _ = _job(fake, target, f"TRAIN_EXTRA={' '.join(extra)}")
        assert run.command[-len(extra):] == extra, target
        ns = _parse_boneage(run.command)
        assert ns.ddp_workers == 3 and ns.overrides == extra[:2], target


def test_training_with_config_path_names_run_after_the_file(fake):
    run, _ = _job(fake, "training", "CONFIG=configs/my-exp.yaml")
    ns = _parse_boneage(run.command)
    assert ns.config == "configs/my-exp.yaml" and ns.out == "/boneage/results/my-exp"


def test_training_dry_runs_print_the_same_valid_commands(fake):
    """`make -n training(-ddp)` shows commands that parse, and they are what `make training(-ddp)` runs."""
    for target in ("training", "training-ddp"):
        out = fake.make("-n", target, "TRAIN_EXTRA=train.epochs=3").stdout.replace("\\\n", " ")
        shown = [parse_apolo(shlex.split(ln)[1:]) for ln in out.splitlines() if ln.startswith("apolo ")]
        assert fake.calls() == []  # -n runs nothing
        fake.make(target, "TRAIN_EXTRA=train.epochs=3")
        assert [c.argv for c in shown] == fake.calls(), target
        assert shown[-1].path == ("run",)


def test_jupyter(fake):
    run, _ = _job(fake, "jupyter", uploads=5)
    calls = fake.parsed()
    _assert_code_upload(calls)
    _assert_upload(calls[2], calls[3], "notebooks", f"{STORAGE}/notebooks")
    assert calls[4].path == ("mkdir",) and calls[4].positionals == [f"{STORAGE}/data", f"{STORAGE}/results"]
    assert run.value("--name") == "jupyter-boneage" and run.value("--preset") == "gpu-small"
    assert run.flag("--http-auth") is True and run.flag("--browse") and run.flag("--detach")
    assert run.volumes() == {
        "/boneage/src": VolumeSpec(f"{STORAGE}/src", "/boneage/src", "ro"),
        "/boneage/data": VolumeSpec(f"{STORAGE}/data", "/boneage/data", "ro"),
        "/boneage/notebooks": VolumeSpec(f"{STORAGE}/notebooks", "/boneage/notebooks", "rw"),  # edits are kept
        "/boneage/results": VolumeSpec(f"{STORAGE}/results", "/boneage/results", "rw"),
    }
    # The demo notebook reads the data volume and writes its outputs to the results volume (kept).
    assert run.env() == {"PYTHONPATH": "/boneage/src", "BONEAGE_DATA_DIR": "/boneage/data",
                         "BONEAGE_NB_OUT": "/boneage/results/notebook"} and run.value("--workdir") == "/boneage"
    assert run.image == IMAGE and run.command[:2] == ["jupyter", "lab"]
    # JupyterLab listens on the forwarded port, on every interface; the platform's HTTP auth guards it.
    assert f"--port={run.value('--http-port')}" in run.command and "--ip=0.0.0.0" in run.command
    assert "--IdentityProvider.token=" in run.command and "--ServerApp.root_dir=/boneage" in run.command


def test_http_auth_can_be_switched_off(fake):
    for target in ("jupyter", "tensorboard", "filebrowser"):
        fake.make(target, "HTTP_AUTH=--no-http-auth")
        assert fake.parsed()[-1].flag("--http-auth") is False, target


def test_tensorboard(fake):
    run, _ = _job(fake, "tensorboard", uploads=0)
    assert run.value("--name") == "tensorboard-boneage" and run.value("--preset") == "cpu-small"
    assert run.flag("--http-auth") is True and run.flag("--browse") and run.flag("--detach")
    assert run.volumes() == {"/boneage/results": VolumeSpec(f"{STORAGE}/results", "/boneage/results", "ro")}
    assert run.image == IMAGE and run.command[0] == "tensorboard"
    assert f"--port={run.value('--http-port')}" in run.command and "--host=0.0.0.0" in run.command
    assert "--logdir=/boneage/results" in run.command


def test_filebrowser(fake):
    run, _ = _job(fake, "filebrowser", uploads=0)
    assert run.value("--name") == "filebrowser-boneage" and run.value("--preset") == "cpu-small"
    # File Browser's own login is off (--noauth): the platform's HTTP auth is what protects it.
    assert run.flag("--http-auth") is True and "--noauth" in run.command
    assert run.flag("--browse") and run.flag("--detach")
    assert run.volumes() == {"/srv": VolumeSpec(STORAGE, "/srv", "rw")}
    assert run.image == "filebrowser/filebrowser:latest"
    assert f"--port={run.value('--http-port')}" in run.command and "--root=/srv" in run.command
    assert not any(_inside(a.split("=", 1)[1], "/srv") for a in run.command if a.startswith("--database="))


def test_storage_targets(fake, tmp_path):
    data = tmp_path / "mydata"
    _write_dataset(data)
    uploads = {  # target -> (local folder, storage folder)
        ("upload-code",): ("src", f"{STORAGE}/src"),
        ("upload-notebooks",): ("notebooks", f"{STORAGE}/notebooks"),
        ("upload-data", f"DATA_DIR={data}"): (str(data), f"{STORAGE}/data"),
        ("upload-code", "PROJECT_STORAGE=storage:/other-project/ba"): ("src", "storage:/other-project/ba/src"),
    }
    for args, (src, dst) in uploads.items():
        fake.make(*args)
        calls = fake.parsed()
        assert len(calls) == 2, args
        _assert_upload(*calls, src, dst)
    fake.make("upload-code")
    _assert_code_upload(fake.parsed())
    fake.make("upload")
    assert [c.positionals[-1] for c in fake.parsed()] == [f"{STORAGE}/src"] * 2 + [f"{STORAGE}/notebooks"] * 2

    downloads = {
        ("download-results",): (f"{STORAGE}/results", "results"),
        ("download-results", "RESULTS_DIR=/tmp/r"): (f"{STORAGE}/results", "/tmp/r"),
        ("download-notebooks",): (f"{STORAGE}/notebooks", "notebooks"),
    }
    for args, (src, dst) in downloads.items():
        fake.make(*args)
        (cp,) = fake.parsed()
        assert cp.path == ("cp",) and cp.positionals == [src, dst], args
        assert cp.flag("--recursive") and cp.flag("--update") and cp.flag("--no-target-directory"), args

    for what in ("code", "data", "notebooks", "results"):
        fake.make(f"clean-{what}")
        (rm,) = fake.parsed()
        folder = "src" if what == "code" else what
        assert rm.path == ("rm",) and rm.flag("--recursive") and rm.positionals == [f"{STORAGE}/{folder}"], what


def _write_dataset(folder: Path, n: int = 3) -> Path:
    """A tiny dataset in the one layout (images/<id>.png + labels.csv) that boneage.data.read_labels accepts."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["id,boneage,male"]
    for i in range(n):
        (folder / "images" / f"{1000 + i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not decoded by the check")
        rows.append(f"{1000 + i},{60 + 30 * i},{'True' if i % 2 else 'False'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("content, missing", [
    ((), ["the images folder", "(absent or empty)", "and the labels file"]),  # a fresh clone's data/ (.gitkeep)
    (("images/",), ["the images folder", "(absent or empty)"]),
    (("images/1.png",), ["the labels file"]),
    (("labels.csv",), ["the images folder"]),
])
def test_upload_data_refuses_a_folder_without_images_or_labels(fake, tmp_path, content, missing):
    data = tmp_path / "data"
    data.mkdir()
    (data / ".gitkeep").write_text("")
    for rel in content:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        if not rel.endswith("/"):
            (data / rel).write_text("x")
    proc = fake.make("upload-data", f"DATA_DIR={data}", check=False)
    assert proc.returncode != 0 and "nothing uploaded" in proc.stderr, proc.stderr
    for words in missing:
        assert words in proc.stderr, (words, proc.stderr)
    if "labels.csv" in content:
        assert "the labels file" not in proc.stderr
    assert "make download-data" in proc.stderr
    assert fake.calls() == []  # refused before any upload


def test_upload_data_refuses_missing_folder(fake, tmp_path):
    proc = fake.make("upload-data", f"DATA_DIR={tmp_path / 'nope'}", check=False)
    assert proc.returncode != 0
    assert "is not a folder" in proc.stderr
    assert fake.calls() == []


def test_job_control_targets(fake):
    expected = {  # target -> (command, job)
        "kill-training": (("kill",), "training-boneage"),
        "kill-training-ddp": (("kill",), "training-ddp-boneage"),
        "kill-jupyter": (("kill",), "jupyter-boneage"),
        "kill-tensorboard": (("kill",), "tensorboard-boneage"),
        "kill-filebrowser": (("kill",), "filebrowser-boneage"),
        "kill-setup": (("kill",), "setup-boneage"),
        "connect-training": (("exec",), "training-boneage"),
        "logs-training": (("logs",), "training-boneage"),
    }
    for target, (path, job) in expected.items():
        fake.make(target)
        (call,) = fake.parsed()
        assert call.path == path and call.positionals == [job], target
    fake.make("connect-training")
    (shell,) = fake.parsed()
    assert shell.command == ["bash"] and shell.flag("--tty") is not False  # interactive
    fake.make("ps")
    (ps,) = fake.parsed()
    assert ps.path == ("ps",) and ps.value("--tag") == TAG


def test_kill_targets_tolerate_missing_jobs(fake):
    for target in ("kill-training", "kill-training-ddp", "kill-jupyter", "kill-tensorboard", "kill-filebrowser",
                   "kill-setup"):
        proc = fake.make(target, check=False, FAKE_APOLO_FAIL="kill")
        assert proc.returncode == 0, (target, proc.stderr)


def test_kill_terminates_every_job_with_the_project_tag(fake):
    proc = fake.make("kill", FAKE_APOLO_PS_IDS="job-aaa job-bbb")
    ps, kill = fake.parsed()
    assert ps.path == ("ps",) and ps.global_options.get("--quiet") and ps.value("--tag") == TAG
    assert kill.path == ("kill",) and kill.positionals == ["job-aaa", "job-bbb"]
    assert "job-aaa" in proc.stdout

    proc = fake.make("kill", FAKE_APOLO_PS_IDS="")
    assert [c.path for c in fake.parsed()] == [("ps",)]
    assert "No running or pending jobs" in proc.stdout

    proc = fake.make("kill", check=False, FAKE_APOLO_FAIL="ps", FAKE_APOLO_PS_IDS="job-aaa")
    assert proc.returncode != 0 and [c.path for c in fake.parsed()] == [("ps",)]


def test_neuro_is_an_alias(fake):
    fake.make("kill-training", "APOLO=neuro")
    assert [(r["prog"], r["argv"]) for r in fake.records()] == [("neuro", ["kill", "training-boneage"])]


PLATFORM_TARGETS = [
    ("setup",), ("training",), ("training-ddp",), ("jupyter",), ("tensorboard",), ("filebrowser",),
    ("upload-code",), ("upload-notebooks",), ("download-notebooks",), ("download-results",),
    ("clean-code",), ("clean-data",), ("clean-notebooks",), ("clean-results",), ("kill-training",),
    ("kill-training-ddp",), ("kill-jupyter",), ("kill-tensorboard",), ("kill-filebrowser",),
    ("kill-setup",), ("connect-training",), ("logs-training",), ("ps",), ("kill",),
    ("jupyter", "HTTP_AUTH=--no-http-auth"),
]


def test_every_flag_the_makefile_passes_exists_in_the_apolo_cli(fake, tmp_path):
    _write_dataset(tmp_path / "d")
    seen: set[tuple[str, ...]] = set()
    for args in [*PLATFORM_TARGETS, ("upload-data", f"DATA_DIR={tmp_path / 'd'}")]:
        fake.make(*args, FAKE_APOLO_PS_IDS="job-1")
        calls = fake.parsed()
        assert calls, args
        seen.update(c.path for c in calls)
    assert {("run",), ("exec",), ("cp",), ("mkdir",), ("rm",), ("kill",), ("ps",), ("logs",),
            ("job", "save")} <= seen


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


class _OfflineParse:
    """The one piece of an apolo client's ``parse`` that `apolo-flow --dry-run` uses for live.yml.

    ``str_to_uri(uri, short=True)`` of a project-relative URI (what live.yml writes, e.g.
    ``storage:boneage/src`` or ``image:boneage:latest``) is that URI itself; anything else is refused,
    so a live.yml that needs the real client (a full URI, another project) fails here loudly.
    """

    def str_to_uri(self, uri: str, *, short: bool = False, **_ignored):
        from yarl import URL

        scheme, _, rest = uri.partition(":")
        if scheme not in ("storage", "image") or not rest or rest.startswith("/") or not short:
            raise ValueError(f"the offline stand-in only takes short project-relative URIs, not {uri!r}")
        return URL(uri.rstrip("/"))


def _flow_dry_run(params: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """The `apolo ...` commands `apolo-flow --dry-run run JOB` prints, evaluated offline."""
    ConfigDir, _ = _import_flow()
    try:
        from apolo_flow.live_runner import LiveRunner
        from rich.console import Console
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"apolo_flow changed ({exc})")
    config = types.SimpleNamespace(project_name_or_raise="myproj", project_name="myproj", cluster_name="default",
                                   org_name=None, username="alice")
    client = types.SimpleNamespace(config=config, parse=_OfflineParse())
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


def test_live_yml_jobs_use_only_real_apolo_options_and_match_the_makefile(fake):
    runs = _flow_dry_run({
        "train": {}, "train_ddp": {}, "jupyter": {}, "tensorboard": {}, "filebrowser": {},
    })
    pairs = {"train": "training", "train_ddp": "training-ddp", "jupyter": "jupyter",
             "tensorboard": "tensorboard", "filebrowser": "filebrowser"}
    for job_id, target in pairs.items():
        assert runs[job_id][0] == "apolo"
        flow = parse_apolo(runs[job_id][1:])
        assert flow.path == ("run",)
        fake.make(target)
        make = fake.parsed()[-1]
        for key in ("--preset", "--workdir", "--http-port", "--http-auth", "--browse", "--detach", "--restart"):
            assert flow.values(key) == make.values(key), (job_id, key)
        assert flow.volumes() == make.volumes() and flow.env() == make.env(), job_id
        assert (flow.image, flow.command) == (make.image, make.command), job_id
        assert TAG in flow.values("--tag"), job_id
        if make.values("--life-span"):
            assert parse_duration(flow.value("--life-span")) == parse_duration(make.value("--life-span")), job_id
    # Code (and notebooks for jupyter) are uploaded before the job starts, as in the Makefile.
    assert any("cp --recursive --update --no-target-directory" in ln and ln.endswith("storage:boneage/src")
               for ln in runs["train:uploads"])
    assert any(ln.endswith("storage:boneage/notebooks") for ln in runs["jupyter:uploads"])


def test_live_yml_train_params(fake):
    runs = _flow_dry_run({"train": {"config": "resnet50", "extra": "train.epochs=3"}})
    ns = _parse_boneage(parse_apolo(runs["train"][1:]).command)
    assert (ns.config, ns.out, ns.resume, ns.overrides) == (
        "resnet50", "/boneage/results/resnet50", True, ["train.epochs=3"])
    assert (ns.images, ns.labels) == ("/boneage/data/images", "/boneage/data/labels.csv")


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
    def train_local(*args: str):
        (line,) = [ln for ln in fake.make("-n", "train-local", *args).stdout.replace("\\\n", " ").splitlines()
                   if ln.strip()]
        return shlex.split(line), _parse_boneage(shlex.split(line))

    _, ns = train_local("CONFIG=resnet50", "DATA_DIR=/x")
    assert (ns.command, ns.config, ns.images, ns.labels, ns.out, ns.resume) == (
        "train", "resnet50", "/x/images", "/x/labels.csv", "results/resnet50", True)
    argv, ns = train_local("TRAIN_EXTRA=train.epochs=2 --engine cpu", "RESULTS_DIR=/r")
    assert ns.out == "/r/lite0-gpu" and ns.overrides == ["train.epochs=2"] and ns.engine == "cpu"
    assert argv[-3:] == ["train.epochs=2", "--engine", "cpu"]  # last, so it can override


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
    (row_100000,) = [r for r in csv.DictReader(open(demo / "reports" / "predictions.csv")) if r["file"] == "100000.png"]
    report = json.loads((demo / "reports" / (row_100000["report"] + ".json")).read_text())
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

def _pins(path) -> dict[str, str]:
    """``name==version`` lines of a requirements / constraints file, names normalised."""
    from packaging.requirements import Requirement

    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            (spec,) = r.specifier  # exactly one specifier ...
            assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"  # ... and an exact one
            pins[re.sub(r"[-_.]+", "-", r.name.lower())] = spec.version
    return pins


def test_requirements_pin_exactly_what_pyproject_allows():
    """pyproject.toml holds ranges; requirements.txt (the platform image) pins the base install, [train],
    [dicom] and the Jupyter job exactly, at the versions of the constraints file CI passed with."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    image, constraints = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-dev.txt")
    wanted = [*project["dependencies"], *(r for extra in ("train", "dicom", "notebook")
                                          for r in project["optional-dependencies"][extra])]
    for line in wanted:
        r = Requirement(line)
        name = re.sub(r"[-_.]+", "-", r.name.lower())
        assert name in image, f"requirements.txt lacks {name}"
        assert r.specifier.contains(image[name], prereleases=True), f"{name}=={image[name]} is outside {r.specifier}"
        assert image[name] == constraints.get(name), f"{name}: requirements.txt {image[name]} != constraints"
    assert not [r for r in project["dependencies"] if Requirement(r).specifier and
                all(s.operator == "==" for s in Requirement(r).specifier)], "pyproject.toml: ranges, not pins"
    assert "boneage" not in image


def test_the_base_install_leaves_training_out():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert not base & {"catalyst", "accelerate", "tensorboard", "matplotlib"}
    assert {"torch", "onnxruntime"} <= base
    extras = project["optional-dependencies"]
    assert {"catalyst", "accelerate", "tensorboard", "matplotlib"} <= {Requirement(r).name.lower()
                                                                       for r in extras["train"]}
    (everything,) = extras["all"]
    assert {"train", "download", "dicom", "onnx", "gradcam", "app"} <= set(
        Requirement(everything).extras)


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

def test_local_commands_parse_with_the_boneage_cli(fake):
    # (The jobs' commands: test_training_* above.)
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
        ns = _parse_boneage(parse_apolo(runs[job_id][1:]).command)
        assert ns.resume is True and (ns.engine == "ddp") == (job_id == "train_ddp")


# --------------------------------------------------------------------------------------
# The Ray cluster targets: ray-head, ray-workers, predict-archive, ray-kill
# --------------------------------------------------------------------------------------

RAY_TAG = "ray-cluster:boneage"
# What `apolo status` shows as "Internal Hostname Named" (Apolo's guide: ray-head--0e1436ea6a.platform-jobs);
# longer than an 80-column table cell on purpose: apolo prints piped output 2048 columns wide, nothing cropped.
HEAD_HOST = "ray-head-boneage--0e1436ea6a.project--an-org--a-project-with-a-rather-long-name--0e1436ea6a"


def _apolo_status_text(name: str, host: str | None, status: str = "running") -> str:
    """`apolo status NAME` as the installed apolo CLI prints it into a pipe (its own JobStatusFormatter, and the
    console apolo's Root makes when stdout is no terminal: 2048 columns, no colour)."""
    pytest.importorskip("apolo_cli")
    from datetime import datetime, timezone
    from decimal import Decimal

    from apolo_cli.formatters.jobs import JobStatusFormatter
    from apolo_cli.formatters.utils import get_datetime_formatter, uri_formatter
    from apolo_sdk import (Container, JobDescription, JobRestartPolicy, JobStatus, JobStatusHistory, RemoteImage,
                           Resources)
    from rich.console import Console
    from yarl import URL

    now = datetime.now(timezone.utc)
    job_id = "job-324eab93-5fec-4cf6-bda5-3b6c701162bb"
    job = JobDescription(
        id=job_id, owner="alice", cluster_name="default", org_name=None, project_name="alice", namespace="",
        status=JobStatus(status), history=JobStatusHistory(
            status=JobStatus(status), reason="", description="", created_at=now, started_at=now,
            finished_at=now if JobStatus(status).is_finished else None),
        container=Container(image=RemoteImage.new_external_image(name="python", tag="3.11"),
                            resources=Resources(memory=2**30, cpu=1.0), command="bash -c 'ray start --head'"),
        scheduler_enabled=False, pass_config=False, uri=URL(f"job://default/alice/{job_id}"),
        total_price_credits=Decimal(0), price_credits_per_hour=Decimal(0), name=name, tags=(TAG, RAY_TAG),
        internal_hostname=f"{job_id}.platform-jobs", internal_hostname_named=host,
        restart_policy=JobRestartPolicy.NEVER, life_span=86400.0, preset_name="cpu-small")
    formatter = JobStatusFormatter(uri_formatter=uri_formatter(project_name="alice", cluster_name="default",
                                                               org_name=None),
                                   datetime_formatter=get_datetime_formatter(False))
    out = io.StringIO()
    Console(file=out, color_system=None, force_terminal=False, highlight=False, log_path=False,
            width=2048).print(formatter(job))
    return out.getvalue()


@pytest.fixture
def ray_fake(fake, tmp_path):
    """The fake apolo, plus: `apolo status` prints tmp_path/status.txt (when there is one), and `apolo secret add
    KEY @FILE` keeps a copy of FILE in tmp_path/secret.txt (the Makefile deletes FILE)."""
    status, secret = tmp_path / "status.txt", tmp_path / "secret.txt"
    wrapper = tmp_path / "bin" / "apolo"
    wrapper.write_text(
        f'#!/bin/sh\nFAKE_APOLO_PROG=apolo "{sys.executable}" "{FAKE_APOLO}" "$@" || exit $?\n'
        f'case "$1" in\n  status) if [ -f "{status}" ]; then cat "{status}"; fi ;;\n'
        f'  secret) cp "${{4#@}}" "{secret}" ;;\nesac\n')
    fake.status_file, fake.secret_file = status, secret

    def head(status_text: str | None) -> None:
        if status_text is None:
            status.unlink(missing_ok=True)
        else:
            status.write_text(status_text)

    fake.set_head = head
    return fake


def _bash_script(run: ApoloCall) -> str:
    """The script of a Ray job (`bash -c SCRIPT`); bash itself finds it well-formed."""
    assert run.command[:2] == ["bash", "-c"] and len(run.command) == 3, run.command
    script = run.command[2]
    proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, (script, proc.stderr)
    return script


def _script_steps(script: str) -> list[list[str]]:
    """The script's simple commands (split at ; && ||), each split like the shell would."""
    return [shlex.split(step) for step in re.split(r";|&&|\|\|", script) if step.strip()]


def _assert_ray_job(run: ApoloCall, results_mode: str, archive: str = f"{STORAGE}/data/images") -> dict[str, str]:
    """What every Ray job shares; returns its environment."""
    assert run.path == ("run",) and run.flag("--detach") and run.image == IMAGE
    assert run.value("--restart") == "never"  # a dead head, worker or driver must not loop
    assert parse_duration(run.value("--life-span")) == 86400
    assert TAG in run.values("--tag")  # make ps / make kill see them too
    assert run.volumes() == {
        "/boneage/src": VolumeSpec(f"{STORAGE}/src", "/boneage/src", "ro"),
        "/boneage/data": VolumeSpec(f"{STORAGE}/data", "/boneage/data", "ro"),
        "/boneage/archive": VolumeSpec(archive, "/boneage/archive", "ro"),
        "/boneage/results": VolumeSpec(f"{STORAGE}/results", "/boneage/results", results_mode),
    }
    assert run.value("--workdir") == "/boneage"
    env = run.env()
    assert env["PYTHONPATH"] == "/boneage/src" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    # The cluster is closed: every job carries the token of the Apolo secret ray-head wrote.
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "secret:ray-token-boneage"
    script = _bash_script(run)
    assert script.startswith("set -e; ") and '"ray[data]==2.60.0"' in script  # Ray, when the image has none
    return env


def test_ray_targets_use_only_real_apolo_options(ray_fake):
    ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST))
    seen: set[tuple[str, ...]] = set()
    for args in [("ray-workers", "RAY_WORKERS=3"), ("predict-archive",), ("ray-kill",)]:
        ray_fake.make(*args, FAKE_APOLO_PS_IDS="job-1 job-2")
        seen.update(c.path for c in ray_fake.parsed())
    ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST, "cancelled"))
    ray_fake.make("ray-head")
    seen.update(c.path for c in ray_fake.parsed())
    assert {("run",), ("status",), ("secret", "add"), ("ps",), ("kill",)} <= seen


def test_ray_head_starts_a_closed_named_cluster_head(ray_fake):
    ray_fake.set_head(None)  # no head job yet: `apolo status` prints nothing
    proc = ray_fake.make("ray-head")
    calls = ray_fake.parsed()
    assert [c.path for c in calls] == [("mkdir",), ("cp",), ("status",), ("secret", "add"), ("run",)]
    _assert_code_upload(calls)
    status, secret, run = calls[2:]
    assert status.positionals == ["ray-head-boneage"]
    # A new random token goes into the secret the jobs read, through a file that is gone afterwards.
    key, value = secret.positionals
    assert key == "ray-token-boneage" and value.startswith("@") and not Path(value[1:]).exists()
    assert re.fullmatch(r"[0-9a-f]{64}", ray_fake.secret_file.read_text())
    assert "@<a new random token>" in proc.stdout and ray_fake.secret_file.read_text() not in proc.stdout
    assert run.value("--name") == "ray-head-boneage" and run.value("--preset") == "cpu-small"
    assert RAY_TAG in run.values("--tag")
    env = _assert_ray_job(run, "ro")
    assert "RAY_HEAD_ADDRESS" not in env
    assert _script_steps(_bash_script(run))[-1] == [
        "ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0", "--block"]
    first = ray_fake.secret_file.read_text()
    ray_fake.make("ray-head")
    assert ray_fake.secret_file.read_text() != first  # every head gets its own token


def test_ray_head_refuses_while_a_head_is_up(ray_fake):
    for state in ("running", "pending"):
        ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST, state))
        proc = ray_fake.make("ray-head", check=False)
        assert proc.returncode != 0 and "make ray-kill first" in proc.stderr, state
        # The running cluster's token stays: no new secret, no second head.
        assert [c.path for c in ray_fake.parsed()][2:] == [("status",)], state
    for state in ("cancelled", "failed", "succeeded"):
        ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST, state))
        ray_fake.make("ray-head")
        assert ray_fake.parsed()[-1].path == ("run",), state


def test_ray_workers_join_the_heads_internal_hostname(ray_fake):
    ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST, "pending"))
    ray_fake.make("ray-workers", "RAY_WORKERS=3")
    status, *runs = ray_fake.parsed()
    assert status.path == ("status",) and status.positionals == ["ray-head-boneage"]  # looked up once
    assert [r.value("--name") for r in runs] == [f"ray-worker-boneage-{i}" for i in (1, 2, 3)]
    for run in runs:
        assert run.value("--preset") == "gpu-small" and RAY_TAG in run.values("--tag")
        env = _assert_ray_job(run, "ro")
        assert env["RAY_HEAD_ADDRESS"] == f"{HEAD_HOST}:6379"
        steps = _script_steps(_bash_script(run))
        assert steps[-1] == ["ray", "start", "--address=$RAY_HEAD_ADDRESS", "--block"]
        assert '"/dev/tcp/${RAY_HEAD_ADDRESS/://}"' in run.command[2]  # it waits for the head's port first
    # The default count, and an explicit head address (no lookup).
    ray_fake.make("ray-workers")
    assert len(ray_fake.parsed()) == 1 + 2
    ray_fake.make("ray-workers", "RAY_WORKERS=1", "RAY_HEAD_HOST=job-1234.platform-jobs", "RAY_PORT=6380")
    (run,) = ray_fake.parsed()
    assert run.env()["RAY_HEAD_ADDRESS"] == "job-1234.platform-jobs:6380"


def test_ray_workers_need_a_live_head_and_a_count(ray_fake):
    for head, args, message in [
        (_apolo_status_text("ray-head-boneage", HEAD_HOST, "cancelled"), (), "is cancelled: run make ray-head"),
        (_apolo_status_text("ray-head-boneage", None), (), "shows no Internal Hostname Named"),
        (None, ("RAY_WORKERS=0",), "RAY_WORKERS=0 is no positive number"),
        (None, ("RAY_WORKERS=two",), "RAY_WORKERS=two is no positive number"),
    ]:
        ray_fake.set_head(head)
        proc = ray_fake.make("ray-workers", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert ("run",) not in [c.path for c in ray_fake.parsed()], args
    ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST))
    proc = ray_fake.make("ray-workers", check=False, FAKE_APOLO_FAIL="status")  # e.g. no such job
    assert proc.returncode != 0 and [c.path for c in ray_fake.parsed()] == [("status",)]
    proc = ray_fake.make("ray-workers", "RAY_WORKERS=3", check=False, FAKE_APOLO_FAIL="run")
    assert proc.returncode != 0 and [c.path for c in ray_fake.parsed()] == [("status",), ("run",)]  # stops at once


def test_predict_archive_drives_boneage_predict_on_the_cluster(ray_fake):
    ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST))
    proc = ray_fake.make("predict-archive")
    status, run = ray_fake.parsed()
    assert status.positionals == ["ray-head-boneage"]
    assert run.value("--name") == "predict-archive-boneage" and run.value("--preset") == "cpu-small"
    assert RAY_TAG not in run.values("--tag")  # ray-kill leaves a finished or running driver alone
    env = _assert_ray_job(run, "rw")  # the driver writes the table
    assert env["RAY_HEAD_ADDRESS"] == f"{HEAD_HOST}:6379"
    steps = _script_steps(_bash_script(run))
    # The driver joins the cluster as a node without CPUs or GPUs, then connects to it as `auto` ...
    join = steps.index(["ray", "start", "--address=$RAY_HEAD_ADDRESS", "--num-cpus=0", "--num-gpus=0"])
    (predict,) = [s for s in steps if s[:1] == ["boneage"]]
    assert join < steps.index(predict) < steps.index(["ray", "stop"])
    assert steps[-1] == ["exit", "$rc"]  # ... and leaves with boneage's exit status
    ns = _parse_boneage(predict)
    assert ns.command == "predict" and ns.engine == "ray" and ns.ray_address == "auto"
    assert ns.paths == ["/boneage/archive"] and ns.recursive and ns.reports == "none"
    assert ns.checkpoint == ["/boneage/results/lite0-gpu/best.pt"] and ns.out == "/boneage/results/predictions"
    assert "apolo logs predict-archive-boneage" in proc.stdout and "storage:boneage/results/predictions" in proc.stdout


def test_predict_archive_variables_reach_the_job(ray_fake):
    ray_fake.set_head(_apolo_status_text("ray-head-ba2", HEAD_HOST))
    ray_fake.make("predict-archive", "PROJECT=ba2", "ARCHIVE=storage:pacs/2024", "PREDICT_OUT=pacs-2024",
                  "PREDICT_CHECKPOINT=/ba2/results/resnet50/best.pt", "PREDICT_PRESET=cpu-large",
                  "PREDICT_EXTRA=--table parquet --no-tta", "RAY_LIFE_SPAN=3h")
    status, run = ray_fake.parsed()
    assert status.positionals == ["ray-head-ba2"]
    assert run.value("--name") == "predict-archive-ba2" and run.value("--preset") == "cpu-large"
    assert parse_duration(run.value("--life-span")) == 3 * 3600 and run.image == "image:ba2:latest"
    assert run.volumes()["/ba2/archive"] == VolumeSpec("storage:pacs/2024", "/ba2/archive", "ro")
    assert run.env()["RAY_AUTH_TOKEN"] == "secret:ray-token-ba2"
    (predict,) = [s for s in _script_steps(_bash_script(run)) if s[:1] == ["boneage"]]
    assert predict[-3:] == ["--table", "parquet", "--no-tta"]  # last, so it can override
    ns = _parse_boneage(predict)
    assert ns.paths == ["/ba2/archive"] and ns.out == "/ba2/results/pacs-2024" and ns.table == "parquet"
    assert ns.checkpoint == ["/ba2/results/resnet50/best.pt"] and ns.tta is False


def test_ray_jobs_share_one_definition(ray_fake):
    """Head, workers and driver differ only in name, preset, tags, results mode, head address and script."""
    ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST, "cancelled"))
    ray_fake.make("ray-head")
    head = ray_fake.parsed()[-1]
    ray_fake.set_head(_apolo_status_text("ray-head-boneage", HEAD_HOST))
    ray_fake.make("ray-workers", "RAY_WORKERS=1")
    worker = ray_fake.parsed()[-1]
    ray_fake.make("predict-archive")
    driver = ray_fake.parsed()[-1]
    differ = {"--name", "--preset", "--tag", "--volume", "--env"}
    assert {k: v for k, v in head.options.items() if k not in differ} == \
        {k: v for k, v in worker.options.items() if k not in differ} == \
        {k: v for k, v in driver.options.items() if k not in differ}
    shared = {k: v for k, v in head.env().items()}
    assert {k: v for k, v in worker.env().items() if k != "RAY_HEAD_ADDRESS"} == shared
    assert {k: v for k, v in driver.env().items() if k != "RAY_HEAD_ADDRESS"} == shared
    assert worker.env()["RAY_HEAD_ADDRESS"] == driver.env()["RAY_HEAD_ADDRESS"]
    mounts = [{m: (v.remote, v.mode) for m, v in job.volumes().items() if m != "/boneage/results"}
              for job in (head, worker, driver)]
    assert mounts[0] == mounts[1] == mounts[2]  # the same files at the same paths on every node
    assert head.image == worker.image == driver.image


def test_ray_kill_terminates_the_head_and_workers(ray_fake):
    proc = ray_fake.make("ray-kill", FAKE_APOLO_PS_IDS="job-aaa job-bbb job-ccc")
    ps, kill = ray_fake.parsed()
    assert ps.path == ("ps",) and ps.global_options.get("--quiet") and ps.value("--tag") == RAY_TAG
    assert kill.path == ("kill",) and kill.positionals == ["job-aaa", "job-bbb", "job-ccc"]
    assert "job-aaa" in proc.stdout
    proc = ray_fake.make("ray-kill", FAKE_APOLO_PS_IDS="")
    assert [c.path for c in ray_fake.parsed()] == [("ps",)] and "No running or pending jobs" in proc.stdout
    proc = ray_fake.make("ray-kill", check=False, FAKE_APOLO_FAIL="ps", FAKE_APOLO_PS_IDS="job-aaa")
    assert proc.returncode != 0 and [c.path for c in ray_fake.parsed()] == [("ps",)]


# --------------------------------------------------------------------------------------
# The whole platform path, rehearsed offline against a fake platform (storage tree, jobs, secrets)
# --------------------------------------------------------------------------------------

def _load_fake_apolo():
    spec = importlib.util.spec_from_file_location("fake_apolo", FAKE_APOLO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fake_apolo_run_flags_are_the_real_clis():
    table = {o for p in _command("run").params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))
             if getattr(p, "param_type_name", "") == "option" and not _takes_value(p)}
    assert _load_fake_apolo().RUN_FLAGS == table - {"--help"}


@pytest.fixture
def platform(fake, tmp_path):
    """`fake` with a fake platform under tmp_path/platform: storage, jobs that run boneage here, secrets; and a
    stand-in Kaggle client that "downloads" a small dataset in the Kaggle copy's layout."""
    boneage_data = pytest.importorskip("boneage.data")
    source = tmp_path / "kaggle-source"
    synth = boneage_data.make_synth_dataset(tmp_path / "synth", 24, seed=5)
    (source / "boneage-training-dataset").mkdir(parents=True)
    (synth / "images").rename(source / "boneage-training-dataset" / "boneage-training-dataset")
    (synth / "labels.csv").rename(source / "boneage-training-dataset.csv")
    client = tmp_path / "kaggle-client" / "kaggle"
    client.mkdir(parents=True)
    (client / "__init__.py").write_text(
        "import os, shutil\n"
        "class _Api:\n"
        "    def dataset_download_files(self, dataset, path, unzip, quiet):\n"
        "        token = (os.environ['KAGGLE_USERNAME'], os.environ['KAGGLE_KEY'])\n"
        "        assert token == ('rehearsal-user', 'k-SECRET-123')\n"
        "        shutil.copytree(os.environ['FAKE_KAGGLE_SOURCE'], path, dirs_exist_ok=True)\n"
        "api = _Api()\n")
    root = tmp_path / "platform"
    fake.env.update(FAKE_APOLO_STORAGE=str(root), FAKE_APOLO_EXECUTE="boneage,bash", FAKE_KAGGLE_SOURCE=str(source),
                    FAKE_APOLO_PYTHONPATH=str(client.parent), BONEAGE_CACHE_DIR=str(tmp_path / "cache"))
    fake.root = root
    fake.jobs = lambda: json.loads((root / ".fake-apolo" / "state.json").read_text())["jobs"]
    return fake


def test_the_whole_platform_path_offline(platform, tmp_path):
    """download-data, upload-data, setup, training, jupyter, kill in order, on a fake platform: the data arrive in
    the layout the training job reads, a training job on empty storage fails once (no restart loop), the training
    job trains on the data, and the notebook with the Jupyter job's environment and mounts picks the real data."""
    data = platform.root / "boneage" / "data"
    apolo = ["apolo"]

    # 0. Training before there is any data: the check job fails once, the training job never starts.
    proc = platform.make("training", check=False)
    assert proc.returncode != 0
    said = proc.stdout.replace(str(data), "/boneage/data")
    assert "no dataset: the images folder /boneage/data/images/ and the labels file /boneage/data/labels.csv" in said
    jobs = platform.jobs()
    assert [(j["name"], j["restart"], j["runs"], j["status"]) for j in jobs] == \
        [("check-data-boneage", "never", 1, "failed")]  # ran once; no training job, no restart loop

    # 1. make download-data: the Kaggle token comes from Apolo secrets, never from a command line or a log.
    for name, value in (("kaggle-username", "rehearsal-user"), ("kaggle-key", "k-SECRET-123")):
        subprocess.run([*apolo, "secret", "add", name, value], env=platform.env, check=True, capture_output=True)
    proc = platform.make("download-data")
    assert "apolo logs download-data-boneage" in proc.stdout
    download = platform.jobs()[-1]
    assert (download["name"], download["status"], download["restart"], download["runs"]) == \
        ("download-data-boneage", "succeeded", "never", 1), download["log"]
    assert "k-SECRET-123" not in json.dumps(platform.calls()) + proc.stdout + proc.stderr + download["log"]
    run = platform.parsed()[-1]
    assert run.env()["KAGGLE_KEY"] == "secret:kaggle-key" and run.volumes()["/boneage/data"].mode == "rw"
    assert sorted(p.name for p in data.iterdir()) == ["images", "labels.csv"]  # the one layout, no Kaggle names
    assert len(list((data / "images").glob("*.png"))) == 24
    assert (data / "labels.csv").read_text().splitlines()[0] == "id,boneage,male"

    # 2. make upload-data: a local folder in the same layout lands in the same place.
    local = tmp_path / "local-data"
    shutil.copytree(data, local)
    (local / "labels.csv").write_text((data / "labels.csv").read_text())
    platform.make("upload-data", f"DATA_DIR={local}")
    assert sorted(p.name for p in data.iterdir()) == ["images", "labels.csv"]

    # 3. make setup (the image build runs as exec calls, recorded only).
    platform.make("setup")
    assert [j["status"] for j in platform.jobs() if j["name"] == "setup-boneage"] == ["cancelled"]

    # 4. make training: the check passes, then the training job trains on the uploaded data (a tiny run on
    # the CPU here: TRAINING_ENGINE=cpu on purpose).
    proc = platform.make("training", "CONFIG=cpu-small", "TRAINING_ENGINE=cpu",
                         "TRAIN_EXTRA=train.epochs=1 preprocess.size=48 train.batch_size=8 train.num_threads=2 "
                         "data.val_fraction=0.25")
    assert "data OK: 24 labelled images" in proc.stdout
    check, training = platform.jobs()[-2:]
    assert (check["name"], check["status"], training["name"], training["restart"]) == \
        ("check-data-boneage", "succeeded", "training-boneage", "on-failure")
    assert (training["status"], training["runs"]) == ("succeeded", 1), training["log"][-3000:]
    assert (platform.root / "boneage" / "results" / "cpu-small" / "best.pt").is_file()

    # 5. make jupyter: the notebook's data lookup, with the job's environment and mounts, picks the real data.
    platform.make("jupyter")
    run = platform.parsed()[-1]
    assert [j["status"] for j in platform.jobs() if j["name"] == "jupyter-boneage"] == ["running"]
    mounts = {m: platform.root / v.remote[len("storage:"):] for m, v in run.volumes().items()}
    nb = json.loads((ROOT / "notebooks" / "demo.ipynb").read_text())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    job_env = {k: str(mounts.get(v, v)) for k, v in run.env().items()}
    scope: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in job_env.items():
            mp.setenv(k, v)
        exec("".join(params["source"]), scope)  # the parameters cell, reading the job's environment
    lookup = next(src for c in nb["cells"] if "find_notebook_data(DATA_DIR, REPO)" in (src := "".join(c["source"])))
    assert "print(DATA_CHOICE)" in lookup
    from boneage.data.check import find_notebook_data
    found, said = find_notebook_data(scope["DATA_DIR"], None)  # no pyproject.toml in the job: REPO is None
    assert found == data and said == f"data: real radiographs in {data} (DATA_DIR)"
    # ... and on empty storage it would say, loudly, that it draws phantoms.
    assert "NO REAL DATA" in find_notebook_data(str(tmp_path / "empty"), None)[1]

    # 6. make kill: every job of the project that still runs (the Jupyter job) is terminated.
    proc = platform.make("kill")
    assert proc.stdout.startswith("apolo kill job-")
    assert not [j for j in platform.jobs() if j["status"] in ("running", "pending")]
    assert platform.make("kill").stdout.strip() == "No running or pending jobs tagged project:boneage."
