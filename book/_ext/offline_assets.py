"""Serve the book's JavaScript from its own _static folder, so a page opened offline still
typesets maths (sphinx-mathjax-offline ships MathJax) and renders its widgets.

The widget manager (`@jupyter-widgets/html-manager`, ~9 MB with its fonts) and require.js are npm
packages, not PyPI ones: they are fetched once with `npm pack` at the pinned versions and
integrities below into a cache outside git (``book/.vendor/``, or ``$AUXNB_BOOK_VENDOR``), and copied
into ``_build/html/_static/vendor/`` at every build. This module never reaches a CDN at page view.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.fileutil import copy_asset

logger = logging.getLogger(__name__)

# ipywidgets 8.1 renders with html-manager ^1.0 (ipywidgets._version.__html_manager_version__).
PACKAGES = {
    "html-manager": ("@jupyter-widgets/html-manager", "1.0.15",
                     "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA=="),
    "requirejs": ("requirejs", "2.3.8",
                  "sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw=="),
}
# The pages load vendor/requirejs/require.js and vendor/html-manager/dist/embed-amd.js (relative to
# _static/): book/_config.yml sets myst-nb's nb_ipywidgets_js to them instead of its CDN defaults.
_KEEP = {"html-manager": ("dist/",), "requirejs": ("require.js", "package.json", "README.md")}
_SKIP_SUFFIX = (".map",)
_SKIP_NAMES = {"dist/embed.js", "dist/libembed-amd.js"}  # other bundles of the same manager; pages use embed-amd.js


def vendor_dir(app: Sphinx | None = None) -> Path:
    env = os.environ.get("AUXNB_BOOK_VENDOR")
    if env:
        return Path(env)
    return Path(app.srcdir if app else Path(__file__).parents[1]) / ".vendor"


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _fetch(name: str, root: Path) -> None:
    package, version, integrity = PACKAGES[name]
    if shutil.which("npm") is None:
        raise ExtensionError(
            f"offline_assets: {package}@{version} is not in {root} and `npm` is not installed to fetch it. "
            f"Install Node.js/npm (Debian: apt-get install npm) or put the unpacked package under {root / name} "
            "(or point $AUXNB_BOOK_VENDOR at a folder that has it).")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["npm", "pack", "--silent", "--json", f"{package}@{version}"], cwd=tmp,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise ExtensionError(f"offline_assets: `npm pack {package}@{version}` failed:\n{out.stderr.strip()}")
        tgz = Path(tmp) / json.loads(out.stdout)[0]["filename"]
        if _integrity(tgz) != integrity:
            raise ExtensionError(f"offline_assets: {tgz.name} does not match the pinned integrity {integrity}.")
        target = root / name
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[1] if "/" in member.name else member.name
                if not member.isfile() or rel.endswith(_SKIP_SUFFIX) or rel in _SKIP_NAMES:
                    continue
                if not rel.startswith(_KEEP[name]):
                    continue
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src:
                    dest.write_bytes(src.read())
        (target / ".version").write_text(f"{package}@{version} {integrity}\n")


def ensure_vendor(app: Sphinx | None = None) -> Path:
    """The cache folder with every pinned package unpacked (fetched with npm when missing)."""
    root = vendor_dir(app)
    for name, (package, version, integrity) in PACKAGES.items():
        stamp = root / name / ".version"
        if not stamp.exists() or stamp.read_text().split()[0] != f"{package}@{version}":
            if (root / name).exists():
                shutil.rmtree(root / name)
            logger.info(f"offline_assets: fetching {package}@{version} with npm into {root / name}")
            _fetch(name, root)
    return root


def _copy(app: Sphinx, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    vendor = os.path.join(app.outdir, "_static", "vendor")
    copy_asset(str(ensure_vendor(app)), vendor, excluded=lambda path: path.endswith(".version"))
    copy_asset(str(Path(__file__).with_name("widgets-paths.js")), vendor)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", lambda app: ensure_vendor(app))
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
