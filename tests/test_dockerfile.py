"""The Dockerfile, checked statically (no Docker daemon here): stages, pinned base, non-root user, entry point,
every COPY source present, the same install order and pins as `make setup-local`, and the platform build."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined, buffer = [], ""
    for line in path.read_text().splitlines():
        if not buffer and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buffer += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            joined.append(buffer.strip())
            buffer = ""
    assert not buffer, "a continuation line runs off the end of the file"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, args in instructions():
        if op == "FROM":
            out.append([])
        if out:
            out[-1].append((op, args))
    return out


def test_two_named_stages_from_a_pinned_base():
    ops = instructions()
    args = dict(a.split("=", 1) for op, a in ops if op == "ARG" and "=" in a and ops.index((op, a)) == 0)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    froms = [a for op, a in ops if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]


def test_the_runtime_stage_runs_boneage_as_an_unprivileged_user():
    runtime = stages()[-1]
    users = [a for op, a in runtime if op == "USER"]
    assert users == ["boneage"]
    assert any(op == "RUN" and "useradd" in a and "--uid 10001" in a for op, a in runtime)
    entry = [a for op, a in runtime if op == "ENTRYPOINT"]
    assert entry == ['["boneage"]']
    assert ("EXPOSE", "8000") in runtime
    copies = [a for op, a in runtime if op == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies  # only the built environment crosses over
    assert not any(op == "RUN" and "pip install" in a for op, a in runtime)


def test_every_copy_source_exists_and_the_context_sends_nothing_else():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    for op, args in instructions():
        if op != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
    assert ignored[[i for i, line in enumerate(ignored) if not line.startswith("#")][0]] == "*"
    assert not {"data", "runs", "results"} & allowed  # never radiographs, runs or weights in a build context


def test_the_install_steps_match_make_setup_local():
    """torch first with the Makefile's pins, then the package under the same constraints file."""
    makefile = (ROOT / "Makefile").read_text()
    torch_pins = re.search(r"^TORCH_PACKAGES \?= (.+)$", makefile, re.M)[1].split()
    constraints = re.search(r"^CONSTRAINTS \?= (.+)$", makefile, re.M)[1]
    runs = [a for op, a in stages()[0] if op == "RUN" and "pip install" in a]
    assert len(runs) == 2
    assert runs[0].split()[-len(torch_pins):] == torch_pins and "--index-url" in runs[0]
    assert f"-c {constraints}" in runs[1] and '".[app,dicom,gradcam,onnx]"' in runs[1]
    assert "boneage --version" in runs[1]  # the build fails if the entry point does not run


def test_build_args_choose_cpu_or_cuda_torch_and_the_platform_builds_the_same_file():
    build_args = [a for op, a in stages()[0] if op == "ARG"]
    assert build_args == ["TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    live = yaml.safe_load((ROOT / ".apolo" / "live.yml").read_text())
    image = live["images"]["boneage"]
    assert image["dockerfile"] == "$[[ flow.workspace ]]/Dockerfile" and image["context"] == "$[[ flow.workspace ]]"
    assert image["build_args"] == ["TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"]
    makefile = (ROOT / "Makefile").read_text()
    assert "$(APOLO_FLOW) build boneage" in makefile
    assert "$(DOCKER) build --tag $(LOCAL_IMAGE) --build-arg TORCH_INDEX_URL=$(IMAGE_TORCH_INDEX) ." in makefile


@pytest.mark.parametrize("text, problem", [("FROM a \\\n", "runs off the end")])
def test_the_parser_rejects_a_broken_file(tmp_path, text, problem):
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    with pytest.raises(AssertionError, match=problem):
        instructions(path)
