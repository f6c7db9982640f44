"""The README and docs/ true to the code: the documentation site builds with `mkdocs build --strict`, every relative
link of the README and docs/*.md resolves, the benchmark tables of docs/benchmarks.md are those rendered from
benchmarks/results/*.json, the variable table of docs/platform.md against the Makefile, demo numbers against
docs/demo.json, the featured phantom against `boneage synth`, the quick start against .ci/run, and
requirements-dev.txt against the ranges of pyproject.toml."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from test_makefile import MAKEFILE, PLATFORM_DOC, ROOT, _makefile_lines, _pins

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
DEMO_RESULT = DOCS / "demo.json"
BENCHMARKS_DOC = DOCS / "benchmarks.md"
NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"


def _pages() -> list:
    """Every Markdown page of docs/ (the site's pages; the hook and the screenshot script are no pages)."""
    return sorted(DOCS.glob("*.md"))


def _texts() -> dict:
    """README.md and every docs page: path -> text."""
    return {path: path.read_text(encoding="utf-8") for path in (README, *_pages())}


def _strip_code(text: str) -> str:
    """The text without its fenced code blocks (a `# comment` in one is no heading, a `[x](y)` no link)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading (MkDocs' toc agrees for the headings linked here: `mkdocs build --strict`
    checks the anchors with its own slugs)."""
    return re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")


def _anchors(text: str) -> set:
    return {_slug(h) for h in re.findall(r"^#+ (.+?)\s*#*$", _strip_code(text), re.M)}


def _nav_pages() -> list:
    """The pages of mkdocs.yml's nav, in order (docs-relative paths)."""
    import yaml

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from walk(value)
            else:
                yield value

    return list(walk(yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))["nav"]))


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
    # No other page quotes a Makefile default of its own: they link to that table (a second copy would drift).
    for path, text in _texts().items():
        name_ = path.relative_to(ROOT)
        if path != PLATFORM_DOC:
            assert not _variable_table(text), f"{name_} has a variable table; keep the one in docs/platform.md"
        for name, value in defaults.items():
            for m in re.finditer(rf"`{name}`\s*(?:=|is|of|defaults? to)?\s*`?([^`\s,;)]+)", text):
                if re.fullmatch(r"[\d.]+", m.group(1)):  # e.g. "`DEMO_N` 400": a number quoted as the default
                    assert value.split()[:1] == [m.group(1)], f"{name_} says `{name}` {m.group(1)}, Makefile {value!r}"


def _numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text)


def test_demo_numbers_in_the_docs_come_from_the_demo_result_file():
    """Decimal numbers on lines about `make demo` (README and docs pages) must be values of docs/demo.json (a copy of
    a demo run's runs/demo/summary.json), made with the demo settings the Makefile has now."""
    lines = [ln for text in _texts().values() for ln in text.splitlines() if "make demo" in ln]
    assert any("make demo" in ln for ln in README.read_text(encoding="utf-8").splitlines())
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


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    """Every relative link (and image) of README.md and docs/*.md names an existing file and, for a Markdown file,
    an existing heading: the pages read the same on GitHub and, through the hook, on the site."""
    texts = _texts()
    seen = 0
    for source, text in texts.items():
        name = source.relative_to(ROOT)
        for target in re.findall(r"\]\(([^)\s]+)\)", _strip_code(text)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # https:, mailto:
            assert not target.startswith("/"), f"{name}: absolute link {target} (use a relative one)"
            path_part, _, anchor = target.partition("#")
            path = (source.parent / path_part).resolve() if path_part else source
            assert path.exists(), f"{name} links to {target}, which does not exist"
            assert path.is_relative_to(ROOT), f"{name} links to {target}, outside the repository"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path.read_text(encoding="utf-8")), f"{name}: {target} has no such heading"
            seen += 1
    assert seen >= 40


def test_makefile_and_notebook_point_to_existing_docs():
    """`make help`, the Makefile's comments and the notebook name docs/ pages that exist; all of them, and the
    README, point to docs/platform.md (the platform manual and the variable table)."""
    sources = {MAKEFILE: MAKEFILE.read_text(encoding="utf-8"), NOTEBOOK: NOTEBOOK.read_text(encoding="utf-8"),
               README: README.read_text(encoding="utf-8")}
    for source, text in sources.items():
        targets = re.findall(r"(?<![\w/])((?:\.\./)?docs/[\w./-]+?\.md)", text)
        for target in targets:
            path = (source.parent / target) if target.startswith("..") else ROOT / target
            assert path.is_file(), f"{source.relative_to(ROOT)} points to {target}, which does not exist"
        assert any(t.endswith("docs/platform.md") for t in targets), f"{source.name}: no pointer to docs/platform.md"
    help_lines = [ln for ln in sources[MAKEFILE].splitlines() if ln.lstrip().startswith("@echo")]
    assert any("docs/platform.md" in ln for ln in help_lines), "`make help` no longer points to docs/platform.md"


def test_the_readme_links_every_page_and_the_site_has_every_page():
    nav = _nav_pages()
    assert nav[0] == "index.md" and len(nav) == len(set(nav)), nav
    assert sorted(nav) == sorted(p.name for p in _pages()), "docs/*.md and the nav of mkdocs.yml differ"
    readme = README.read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)(?:#[\w-]+)?\)", readme))
    assert set(nav) <= linked, f"README.md does not link {sorted(set(nav) - linked)}"
    for section in ("## Quick start", "## Results", "## Documentation", "## Data terms and citation"):
        assert section in readme, f"README.md lacks its {section!r} section"
    # The long manual sections live in docs/ only (moved, not copied).
    for heading in ("## Install", "## Training", "## Evaluation", "## Web app and REST API", "## Layout",
                    "## Development", "## Benchmarks", "### Pinned versions"):
        assert not re.search(rf"^{re.escape(heading)}\s*$", readme, re.M), f"README.md still has {heading!r}"


def test_mkdocs_builds_the_site_strictly(tmp_path):
    """`mkdocs build --strict` (as CI runs it through this test): no warning at all, every page of the nav
    rendered, the images from img/ copied in, and no link of the site left pointing to a .md file."""
    pytest.importorskip("mkdocs", reason="MkDocs is not installed (it comes with the [dev] extra)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (it comes with the [dev] extra)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    for page in _nav_pages():
        out = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert out.is_file(), f"{page} was not rendered"
    for image in ("img/sample_report.png", "img/serve_page.png"):
        assert (site / image).is_file(), f"{image} was not copied into the site"
    assert (site / "sample_report.html").is_file()
    assert not list(site.rglob("*.py")), "a script of docs/ was published"
    for html in site.rglob("*.html"):
        left = re.findall(r'(?:href|src)="(?![a-z]+:)([^"]*\.md(?:#[^"]*)?)"', html.read_text(encoding="utf-8"))
        assert not left, f"{html.relative_to(site)} links to {left}"
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert benchmarks.count("<table") == BENCHMARKS_DOC.read_text(encoding="utf-8").count("\n|---")
    # the default output folder is never committed
    assert "/site/" in (ROOT / ".gitignore").read_text().splitlines()


def test_benchmark_tables_are_generated_from_the_result_files(tmp_path):
    """The part of docs/benchmarks.md between its markers is exactly what benchmarks/run.py renders from the
    committed benchmarks/results/*.json (as is RESULTS.md), and no other page carries a copy of those tables."""
    if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not of boneage
        sys.path.insert(0, str(ROOT))
    from benchmarks.run import PAGE_END, PAGE_START, refresh_docs

    results = ROOT / "benchmarks" / "results"
    (tmp_path / "results").mkdir()
    for path in results.glob("*.json"):
        shutil.copy(path, tmp_path / "results" / path.name)
    page = tmp_path / "benchmarks.md"
    shutil.copy(BENCHMARKS_DOC, page)
    md = refresh_docs(tmp_path / "results", page)
    regenerate = 'python -c "from benchmarks.run import refresh_docs; refresh_docs()"'
    assert page.read_text(encoding="utf-8") == BENCHMARKS_DOC.read_text(encoding="utf-8"), \
        f"docs/benchmarks.md differs from the rendered JSON results: {regenerate}"
    assert md.read_text() == (results / "RESULTS.md").read_text(), f"RESULTS.md is stale: {regenerate}"
    generated = BENCHMARKS_DOC.read_text(encoding="utf-8").split(PAGE_START, 1)[1].split(PAGE_END, 1)[0]
    rows = {ln for ln in generated.splitlines() if ln.startswith("| ") and not ln.startswith("| key |")}
    assert len(rows) > 20
    for path, text in _texts().items():
        if path != BENCHMARKS_DOC:
            assert PAGE_START not in text, f"{path.relative_to(ROOT)} has a benchmark block; docs/benchmarks.md has it"
            copied = rows & set(text.splitlines())
            assert not copied, f"{path.relative_to(ROOT)} copies generated benchmark rows: {sorted(copied)[:3]}"


def _quick_start() -> list[str]:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_overview_page_has_the_readme_quick_start():
    section = (DOCS / "index.md").read_text(encoding="utf-8").split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert block.strip() == re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8").split(
        "## Quick start", 1)[1], re.S).group(1).strip()


def test_install_page_has_the_torch_pair_of_setup_local():
    install = (DOCS / "install.md").read_text(encoding="utf-8")
    assert f"pip install {_makefile_defaults()['TORCH_PACKAGES']} " in install


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
    ranges = [Requirement(r) for extra in ("dev", "train", "dicom", "onnx", "gradcam", "app", "notebook", "download")
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


def test_torch_pair_of_setup_local_is_the_constraints_pin_inside_the_pyproject_range():
    from packaging.requirements import Requirement

    pins = _pins(ROOT / "requirements-dev.txt")
    assert _makefile_defaults()["TORCH_PACKAGES"].split() == [f"torch=={pins['torch']}",
                                                              f"torchvision=={pins['torchvision']}"]
    ranges = {Requirement(r).name: Requirement(r).specifier
              for r in _tomllib().loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert pins["torch"] in ranges["torch"] and pins["torchvision"] in ranges["torchvision"]
