"""The book's sources: every chapter starts with the Colab/Binder setup cell for the configured
repository, notebooks stay small, and the launch buttons are on."""

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat

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
    assert url.startswith("https://github.com/"), "Colab's launch links need a GitHub repository URL"
    for path in _chapters():
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert code[0].source.startswith(notebook_setup.MARKER), f"{path.name}: the setup cell is not the first code cell"
        assert "hide-input" in code[0].metadata.get("tags", [])
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


def test_launch_buttons_point_at_the_repository():
    config = (BOOK / "_config.yml").read_text()
    assert re.search(r'colab_url:\s*"https://colab\.research\.google\.com"', config)
    assert re.search(r'binderhub_url:\s*"https://mybinder\.org"', config)


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
