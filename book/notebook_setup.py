"""Give every chapter the same first cell, so a page opened on Colab or Binder runs as-is: it installs
auxnb from the book's repository when auxnb is missing and uses the GPU when there is one (where auxnb
is installed, as under nbval here, it changes nothing).

The repository is `repository.url` in book/_config.yml (the launch buttons use it too). To publish the
book from another repository, change that one line and run

    python book/notebook_setup.py

which rewrites the first cell of every notebook in book/_toc.yml (idempotent; outputs untouched).
`python book/notebook_setup.py --check` only reports notebooks whose first cell is missing or stale
(tests/test_book.py runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

BOOK = Path(__file__).resolve().parent
MARKER = "# auxnb-setup:"
TEMPLATE = '''{marker} on Colab or Binder, install auxnb and use the GPU when there is one (no-op where auxnb is installed)
import importlib.util
import os
import subprocess
import sys

REPOSITORY = "{url}"  # book/_config.yml: repository.url
if importlib.util.find_spec("auxnb") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", f"auxnb[plot,mnist] @ git+{{REPOSITORY}}"],
                   check=True)
    os.environ.setdefault("AUXNB_SCALE", "small")  # the scale of the stored outputs; "paper" on a GPU for the papers' protocol
if os.environ.get("AUXNB_DEVICE") is None:
    import torch

    os.environ["AUXNB_DEVICE"] = "cuda" if torch.cuda.is_available() else "cpu"'''


#: the repository URL this project ships with in book/_config.yml: not a published repository
PLACEHOLDER = "https://github.com/auxnb/auxnb"


def repository_url() -> str:
    text = (BOOK / "_config.yml").read_text()
    block = re.search(r"^repository:\n((?:[ \t]+.*\n)+)", text, re.M)
    url = re.search(r"^\s+url:\s*(\S+)", block.group(1), re.M) if block else None
    if not url:
        raise SystemExit("book/_config.yml has no repository.url")
    return url.group(1).strip("\"'")


def notebooks() -> list[Path]:
    toc = (BOOK / "_toc.yml").read_text()
    files = re.findall(r"file:\s*(\S+)", toc)
    return [BOOK / f"{f}.ipynb" for f in files if (BOOK / f"{f}.ipynb").exists()]


def setup_source(url: str) -> str:
    return TEMPLATE.format(marker=MARKER, url=url)


def apply(path: Path, url: str, check: bool) -> bool:
    """True when the notebook's first code cell is (now) the setup cell for `url`."""
    nb = nbformat.read(path, as_version=4)
    source = setup_source(url)
    existing = next((c for c in nb.cells if c.cell_type == "code" and c.source.startswith(MARKER)), None)
    if existing is not None and existing.source == source:
        return True
    if check:
        return False
    if existing is None:
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["hide-input"]})
        cell.pop("id", None)
        if nb.nbformat_minor >= 5:
            cell["id"] = "auxnb-setup"
        nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, cell)
    else:
        existing.source = source
    nbformat.write(nb, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks whose setup cell is missing or stale")
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: every notebook in book/_toc.yml)")
    args = parser.parse_args(argv)
    url = repository_url()
    if url.rstrip("/") == PLACEHOLDER:
        print(f"note: repository.url in book/_config.yml is still the placeholder {PLACEHOLDER}; set it to the "
              "published GitHub repository, then run this script again.", file=sys.stderr)
    stale = [p for p in (args.paths or notebooks()) if not apply(p, url, args.check)]
    for p in stale:
        print(f"{p}: first cell missing or not for {url}; run: python book/notebook_setup.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
