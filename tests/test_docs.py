"""The README and docs/ true to the code: the variable table of docs/platform.md against the Makefile, demo
numbers against docs/demo.json, the featured phantom against `boneage synth`, docs/ links, the quick start against
.ci/run, and requirements-dev.txt against the ranges of pyproject.toml."""

from __future__ import annotations

import json
import re

import pytest

from test_makefile import MAKEFILE, PLATFORM_DOC, ROOT, _makefile_lines, _requirements

README = ROOT / "README.md"
DEMO_RESULT = ROOT / "docs" / "demo.json"


def _makefile_defaults() -> dict[str, str]:
    """NAME -> the value after ``?=`` (stripped), for every user variable."""
    defaults = {}
    for line in _makefile_lines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*\?=\s?(.*)$", line)
        if m:
            defaults[m.group(1)] = m.group(2).strip()
    return defaults


def _variable_table(text: str) -> dict[str, str]:
    """NAME -> default cell of every ``| `NAME` | default | meaning |`` row (backticks removed, '(empty)' -> '')."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*(.*?)\s*\|.*\|\s*$", line)
        if m:
            cell = m.group(2)
            rows[m.group(1)] = "" if cell == "(empty)" else re.sub(r"^`(.*)`$", r"\1", cell)
    return rows


def test_variable_table_defaults_are_the_makefiles():
    defaults = _makefile_defaults()
    table = _variable_table(PLATFORM_DOC.read_text(encoding="utf-8"))
    assert set(table) == set(defaults), (set(defaults) ^ set(table))
    wrong = {name: (table[name], value) for name, value in defaults.items() if table[name] != value}
    assert not wrong, f"docs/platform.md (table) vs Makefile (?=): {wrong}"
    # The README quotes no Makefile default of its own: it links to that table (a second copy would drift).
    readme = README.read_text(encoding="utf-8")
    assert not _variable_table(readme), "README.md has a variable table; keep the one in docs/platform.md"
    for name, value in defaults.items():
        for m in re.finditer(rf"`{name}`\s*(?:=|is|of|defaults? to)?\s*`?([^`\s,;)]+)", readme):
            if re.fullmatch(r"[\d.]+", m.group(1)):  # e.g. "`DEMO_N` 400": a number quoted as the default
                assert value.split()[:1] == [m.group(1)], f"README says `{name}` {m.group(1)}, Makefile {value!r}"


def _numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text)


def test_demo_numbers_in_the_readme_come_from_the_demo_result_file():
    """Decimal numbers on README lines about `make demo` must be values of docs/demo.json (a copy of a demo run's
    runs/demo/summary.json), made with the demo settings the Makefile has now."""
    lines = [ln for ln in README.read_text(encoding="utf-8").splitlines() if "make demo" in ln]
    quoted = [n for ln in lines for n in _numbers(ln)]
    if not quoted:
        return  # no demo numbers quoted: nothing to drift
    assert DEMO_RESULT.is_file(), f"README quotes demo numbers {quoted} but {DEMO_RESULT} does not exist"
    result = json.loads(DEMO_RESULT.read_text())
    defaults = _makefile_defaults()
    assert result["settings"] == {"DEMO_N": int(defaults["DEMO_N"]), "DEMO_TRAIN_EXTRA": defaults["DEMO_TRAIN_EXTRA"],
                                  "DEMO_FEATURED": defaults["DEMO_FEATURED"]}, "docs/demo.json is from other settings"
    values = [v for v in result.values() if isinstance(v, (int, float))]
    if result.get("total_s"):
        values.append(result["total_s"] / 60)  # "1.3 min"
    allowed = {f"{v:.{d}f}" for v in values for d in (1, 2)}
    stale = [n for n in quoted if n not in allowed]
    assert not stale, f"README demo numbers not in docs/demo.json: {stale}"


def test_readme_featured_example_is_the_phantom_the_demo_draws():
    """The quick start shows the demo's featured phantom with its drawn age and sex: those of `boneage synth
    --seed 1` phantom DEMO_FEATURED (make_synth_dataset draws age, then sex, from default_rng([seed, i]))."""
    import numpy as np

    from boneage.clinical import format_age
    from boneage.data.synth import FIRST_ID

    featured = _makefile_defaults()["DEMO_FEATURED"]
    rng = np.random.default_rng([1, int(featured) - FIRST_ID])
    age, male = float(rng.integers(1, 229)), bool(rng.random() < 0.5)
    readme = README.read_text(encoding="utf-8")
    m = re.search(r"featured: runs/demo/holdout/images/(\d+)\.png, a held-out phantom \((\w+)\) drawn at (\d+ y \d+ m)",
                  readme)
    assert m, "the quick start shows no `featured:` line"
    assert m.groups() == (featured, "boy" if male else "girl", format_age(age))


def test_every_docs_link_resolves():
    sources = {README: README.read_text(encoding="utf-8"), MAKEFILE: MAKEFILE.read_text(encoding="utf-8"),
               ROOT / "notebooks" / "demo.ipynb": (ROOT / "notebooks" / "demo.ipynb").read_text(encoding="utf-8"),
               PLATFORM_DOC: PLATFORM_DOC.read_text(encoding="utf-8")}
    seen = 0
    for source, text in sources.items():
        for target in re.findall(r"(?<![\w/])((?:\.\./)?docs/[\w./-]+?\.md)", text):
            path = (source.parent / target) if target.startswith("..") else ROOT / target
            assert path.is_file(), f"{source.relative_to(ROOT)} points to {target}, which does not exist"
            seen += 1
        for target, anchor in re.findall(r"\]\(((?:\.\./)?docs/[\w./-]+\.md)#([\w-]+)\)", text):
            heading_ids = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                           for h in re.findall(r"^#+ (.+)$", (ROOT / target.lstrip("./")).read_text(), re.M)}
            assert anchor in heading_ids, f"{source.name}: {target}#{anchor} has no such heading"
    assert seen >= 3  # README, `make help` and the notebook all point to docs/platform.md
    for target in re.findall(r"\]\((\.\./[\w./-]+|[\w-]+\.md)\)", sources[PLATFORM_DOC]):
        assert (PLATFORM_DOC.parent / target).exists(), f"docs/platform.md links to {target}, which does not exist"
    own = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", sources[PLATFORM_DOC], re.M)}
    for anchor in re.findall(r"\]\(#([\w-]+)\)", sources[PLATFORM_DOC]):
        assert anchor in own, f"docs/platform.md links to #{anchor}, which is no heading of it"


def _quick_start() -> list[str]:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_ci_runs_the_readme_quick_start_in_a_fresh_virtualenv():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [c for line in _quick_start() for c in line.split("&&")]
    assert [c.strip() for c in commands] == ["make setup-local", "make demo", "make test"]
    # A brand-new venv in a temp folder, first on PATH, and PYTHON pointing into it for every make call.
    assert re.search(r'python3 -m venv "\$VENV"', ci) and re.search(r'VENV="\$\(mktemp -d\)/venv"', ci)
    assert 'PATH="$VENV/bin:$PATH"' in ci
    makes = re.findall(r"^\s*(?:time )?(make [^\n]*)$", ci, re.M)
    assert [m.split(" PYTHON=")[0] for m in makes] == ["make setup-local", "make demo", "make test"], makes
    assert all('PYTHON="$PYTHON"' in m for m in makes) and 'PYTHON="$VENV/bin/python"' in ci
    assert "pip install" not in ci  # only the README's commands install anything


def test_constraints_file_pins_every_dev_tool_within_the_pyproject_ranges():
    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = _tomllib()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and not line.startswith("-"), f"requirements-dev.txt: not an exact pin: {line}"
            pins[name.lower().replace("_", "-")] = Version(version)
    assert "boneage" not in pins
    ranges = [Requirement(r) for extra in ("dev", "dicom", "onnx", "gradcam", "timm", "app", "notebook")
              for r in project["optional-dependencies"][extra] if not r.startswith("boneage")]
    ranges += [Requirement(r) for r in project["dependencies"]]
    for req in ranges:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"requirements-dev.txt lacks {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    for tool in ("pytest", "schemathesis", "hypothesis", "playwright", "flake8", "mypy"):
        (spec,) = [r.specifier for r in ranges if r.name == tool]
        assert any(s.operator == "<" for s in spec), f"{tool}: give the [dev] range an upper bound ({spec})"


def _tomllib():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib


def test_torch_pair_of_setup_local_is_the_pyproject_pin():
    deps = _requirements(_tomllib().loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    expected = [f"torch{deps['torch']}", f"torchvision{deps['torchvision']}"]
    assert _makefile_defaults()["TORCH_PACKAGES"].split() == expected
