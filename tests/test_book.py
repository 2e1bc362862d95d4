"""The book's sources: every chapter starts with the setup cell for the configured repository (none
yet: then the cell names no URL and the book shows no launch or repository buttons), notebooks stay
small, and chapter numbers and old addresses hold."""

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def _chapters():
    toc = (BOOK / "_toc.yml").read_text()
    return [BOOK / f"{f}.ipynb" for f in re.findall(r"file:\s*(\S+)", toc) if (BOOK / f"{f}.ipynb").exists()]


def test_every_chapter_has_the_setup_cell_for_the_configured_repository():
    out = subprocess.run([sys.executable, str(BOOK / "notebook_setup.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_setup_cell_is_the_first_code_cell_and_a_no_op_where_auxnb_is_installed():
    sys.path.insert(0, str(BOOK))
    try:
        import notebook_setup
    finally:
        sys.path.pop(0)
    url = notebook_setup.repository_url()
    for path in _chapters():
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert code[0].source.startswith(notebook_setup.MARKER), f"{path.name}: the setup cell is not the first code cell"
        assert "hide-input" in code[0].metadata.get("tags", [])
        if not url:
            assert "http" not in code[0].source, f"{path.name}: the first cell points at a repository that is not published"
    # run here, where auxnb is importable: it installs nothing (no scale default) and keeps the chosen device
    namespace: dict = {}
    saved = {k: os.environ.get(k) for k in ("AUXNB_DEVICE", "AUXNB_SCALE")}
    try:
        os.environ["AUXNB_DEVICE"] = "cpu"
        os.environ.pop("AUXNB_SCALE", None)
        exec(compile(notebook_setup.setup_source(url), "setup-cell", "exec"), namespace)
        assert os.environ["AUXNB_DEVICE"] == "cpu" and "AUXNB_SCALE" not in os.environ
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _setup_module():
    sys.path.insert(0, str(BOOK))
    try:
        import notebook_setup
    finally:
        sys.path.pop(0)
    return notebook_setup


def test_the_repository_url_is_set_in_one_place_and_no_button_points_nowhere():
    import yaml

    notebook_setup = _setup_module()
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    url = notebook_setup.repository_url()
    assert url == (config["repository"]["url"] or "").rstrip("/")
    launch = config.get("launch_buttons") or {}
    shown = [k for k in ("binderhub_url", "colab_url", "jupyterhub_url", "thebe") if launch.get(k)]
    shown += ["repository button"] * bool(config["html"].get("use_repository_button"))
    if not url:
        assert shown == [], f"{shown} would point at a repository that is not published"
    else:
        assert set(shown) >= {"binderhub_url", "colab_url", "repository button"}
    # no other file of the book carries a repository URL of its own
    for path in list(BOOK.glob("*.md")) + list(BOOK.glob("*.yml")) + list(BOOK.glob("*.py")):
        if path.name in ("_config.yml", "notebook_setup.py"):
            continue
        assert "github.com/auxnb" not in path.read_text(), f"{path.name} names a repository URL"


def test_publishing_a_url_turns_the_buttons_on_and_check_then_passes(tmp_path, monkeypatch):
    notebook_setup = _setup_module()
    text = (BOOK / "_config.yml").read_text()
    assert notebook_setup.buttons_problems("") == []  # as shipped
    monkeypatch.setattr(notebook_setup, "BOOK", tmp_path)
    (tmp_path / "_config.yml").write_text(text.replace('url: ""', 'url: https://github.com/someone/auxnb', 1))
    assert notebook_setup.repository_url() == "https://github.com/someone/auxnb"
    assert notebook_setup.buttons_problems("https://github.com/someone/auxnb")  # buttons still off: reported
    notebook_setup.publish_buttons()
    assert notebook_setup.buttons_problems("https://github.com/someone/auxnb") == []
    assert 'REPOSITORY = "https://github.com/someone/auxnb"' in notebook_setup.setup_source("https://github.com/someone/auxnb")
    (tmp_path / "_config.yml").write_text(text.replace('url: ""', "url: https://example.org/x", 1))
    with pytest.raises(SystemExit, match="GitHub repository URL"):
        notebook_setup.repository_url()


def test_the_unpublished_setup_cell_stops_with_the_install_command_where_auxnb_is_missing(tmp_path):
    notebook_setup = _setup_module()
    code = notebook_setup.setup_source("")
    # a Python without auxnb on its path: the cell must stop with the install command, not try a URL
    script = tmp_path / "cell.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-S", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    if "auxnb is not installed" not in out.stderr:
        pytest.skip("auxnb is installed in this interpreter's site-packages")
    assert 'pip install -e ".[plot,mnist]"' in out.stderr


def test_notebooks_stay_under_one_megabyte():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size / 1e6:.2f} MB"


def _reader_numbers():
    """The chapter number a reader sees for each file of the toc (Jupyter Book numbers the chapters of
    every numbered part continuously; an unnumbered part gets none)."""
    import yaml

    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    default = toc.get("defaults", {}).get("numbered", False)
    numbers, n = {}, 0
    for part in toc["parts"]:
        for chapter in part["chapters"]:
            if part.get("numbered", default):
                n += 1
                numbers[chapter["file"]] = n
    return numbers


def test_notebook_file_names_carry_the_chapter_number_readers_see():
    numbers = _reader_numbers()
    on_disk = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(f.split("/", 1)[1] for f in numbers if f.startswith("notebooks/")) == on_disk, \
        "every notebook is a numbered chapter of book/_toc.yml"
    for file, n in numbers.items():
        prefix = re.match(r"notebooks/(\d+)_", file)
        if prefix:
            assert int(prefix.group(1)) == n, f"{file} is chapter {n} in the book: rename it (git mv) or move it in _toc.yml"


def test_moved_chapters_keep_their_old_address():
    import yaml

    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    redirects = config["sphinx"]["config"]["auxnb_redirects"]
    numbers = _reader_numbers()
    for old, new in redirects.items():
        assert new in numbers and old not in numbers and not (BOOK / f"{old}.ipynb").exists()


def test_citations_are_numbered_in_the_text_and_in_the_bibliography():
    import yaml

    config = yaml.safe_load((BOOK / "_config.yml").read_text())["sphinx"]["config"]
    # author-year printed MAOAL and JTDS (both Chen et al., 2022) the same; numbered labels cannot collide
    assert config["bibtex_reference_style"] == "label"
    assert config["bibtex_default_style"] in ("plain", "unsrt")
    bib = (BOOK / "references.bib").read_text()
    assert "chen2022maoal" in bib and "chen2022jtds" in bib


def test_the_api_page_opens_with_the_users_entry_points():
    text = (BOOK / "api.md").read_text()
    first_section = text.split("\n## ")[1]
    assert first_section.startswith("Start here")
    for name in ("experiments.run", "TaskDataset.from_pandas", "build_bundle", "MultiHeadModel.wrap", "train.Trainer",
                 "RunResult.predict"):
        assert name in first_section, f"{name} is not among the entry points"
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections.index("## Experiments: `auxnb.experiments`") < sections.index("## Methods: `auxnb.methods`")


def _readme_commands() -> list[str]:
    head = (ROOT / "README.md").read_text().split("\n---\n")[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", head, re.S)]


def test_the_main_job_installs_the_core_only_and_ci_runs_the_readmes_test_command_exactly():
    first, second = _readme_commands()
    assert re.search(r"pip install -e \. &&", first), "the main job's install must be the core (no extras)"
    assert "[" not in first, "the main job's command installs no extra (test, book, cluster tooling)"
    assert 'pip install -e ".[dev,book]"' in second, "the test command installs the test and book extras itself"
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci.splitlines(), ".ci/run must run the README's test command exactly"
    assert "pip install --quiet -e .\n" in ci  # the first command's environment comes first


def test_the_pytorch_cpu_route_installs_torch_and_torchvision_before_auxnb_in_one_environment():
    text = (ROOT / "README.md").read_text().split("\n---\n")[0]
    cpu = next(line.strip("`") for line in text.splitlines() if "download.pytorch.org/whl/cpu" in line and "venv" in line)
    steps = [s.strip() for s in cpu.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    torch_step = next(i for i, s in enumerate(steps) if s.startswith("pip install torch torchvision --index-url"))
    assert steps.index("pip install -e .") > torch_step  # auxnb then finds torch installed and keeps it
