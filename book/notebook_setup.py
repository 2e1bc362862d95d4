"""Give every chapter the same first cell, and keep the book's launch buttons honest.

The repository URL lives in one place, `repository.url` in book/_config.yml. While it is empty (no
repository has been published yet) the book shows no launch (Colab, Binder) or repository buttons,
and each chapter's first cell only picks the device and, where auxnb is missing, stops with the
install command for a clone. Once a GitHub URL is set there, run

    python book/notebook_setup.py --publish

which turns the launch and repository buttons on in _config.yml and rewrites the first cell of every
notebook in book/_toc.yml to install auxnb from that repository on Colab or Binder (idempotent;
outputs untouched). `python book/notebook_setup.py --check` only reports a first cell or a button
setting that does not match the URL (tests/test_book.py runs it).
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

#: the first cell while no repository is published: nothing depends on a URL
LOCAL_TEMPLATE = '''{marker} use the GPU when there is one; where auxnb is missing, say how to install it
import importlib.util
import os

if importlib.util.find_spec("auxnb") is None:
    raise ModuleNotFoundError(
        "auxnb is not installed in this kernel: in a clone of the auxnb repository run "
        'pip install -e ".[plot,mnist]" (README), then restart the kernel.'
    )
if os.environ.get("AUXNB_DEVICE") is None:
    import torch

    os.environ["AUXNB_DEVICE"] = "cuda" if torch.cuda.is_available() else "cpu"'''

#: the launch buttons a published book shows (book/_config.yml, launch_buttons)
LAUNCHERS = {"binderhub_url": "https://mybinder.org", "colab_url": "https://colab.research.google.com"}


def _config():
    import yaml

    return yaml.safe_load((BOOK / "_config.yml").read_text())


def repository_url() -> str:
    """`repository.url` of book/_config.yml; "" while no repository is published."""
    url = (_config().get("repository") or {}).get("url") or ""
    url = str(url).strip()
    if url and not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+/?", url):
        raise SystemExit(f"repository.url in book/_config.yml is {url!r}; give a GitHub repository URL "
                         "(https://github.com/OWNER/NAME) or leave it empty.")
    return url.rstrip("/")


def buttons_problems(url: str) -> list[str]:
    """What in book/_config.yml's buttons does not match `url` (empty: nothing)."""
    config = _config()
    launch = config.get("launch_buttons") or {}
    repo_button = bool((config.get("html") or {}).get("use_repository_button"))
    problems = []
    if not url:
        on = [k for k in ("binderhub_url", "colab_url", "jupyterhub_url", "thebe") if launch.get(k)]
        if on or repo_button:
            problems.append(f"repository.url is empty but {', '.join(on + ['use_repository_button'] * repo_button)} "
                            "would show buttons pointing nowhere; clear them or set the URL")
    else:
        off = [k for k, v in LAUNCHERS.items() if launch.get(k) != v]
        if off or not repo_button:
            problems.append(f"repository.url is {url} but {', '.join(off + ['use_repository_button'] * (not repo_button))} "
                            "are off; run: python book/notebook_setup.py --publish")
    return problems


def publish_buttons() -> None:
    """Turn the launch and repository buttons on in book/_config.yml (text edits: comments stay)."""
    path = BOOK / "_config.yml"
    text = path.read_text()
    for key, value in LAUNCHERS.items():
        text = re.sub(rf'^(\s+{key}:\s*).*$', rf'\g<1>"{value}"', text, flags=re.M)
    text = re.sub(r"^(\s+use_repository_button:\s*).*$", r"\g<1>true", text, flags=re.M)
    path.write_text(text)


def notebooks() -> list[Path]:
    toc = (BOOK / "_toc.yml").read_text()
    files = re.findall(r"file:\s*(\S+)", toc)
    return [BOOK / f"{f}.ipynb" for f in files if (BOOK / f"{f}.ipynb").exists()]


def setup_source(url: str) -> str:
    return TEMPLATE.format(marker=MARKER, url=url) if url else LOCAL_TEMPLATE.format(marker=MARKER)


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
    parser.add_argument("--check", action="store_true", help="only report first cells or buttons that do not match the URL")
    parser.add_argument("--publish", action="store_true", help="turn the launch and repository buttons on (needs repository.url)")
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: every notebook in book/_toc.yml)")
    args = parser.parse_args(argv)
    url = repository_url()
    if args.publish:
        if not url:
            print("error: set repository.url in book/_config.yml to the published GitHub repository first.", file=sys.stderr)
            return 2
        publish_buttons()
    problems = buttons_problems(url)
    for problem in problems:
        print(f"book/_config.yml: {problem}", file=sys.stderr)
    stale = [p for p in (args.paths or notebooks()) if not apply(p, url, args.check)]
    for p in stale:
        print(f"{p}: first cell missing or not for {url or 'an unpublished book'}; run: python book/notebook_setup.py",
              file=sys.stderr)
    return 1 if stale or problems else 0


if __name__ == "__main__":
    sys.exit(main())
