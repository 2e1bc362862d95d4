"""Pages that moved keep their old address: for each ``old: new`` pair in the ``auxnb_redirects``
setting (document names without suffix, as in ``_toc.yml``), the HTML build writes ``old.html``,
a small page that sends the browser on to ``new.html`` (a meta refresh, with a link for readers
whose browser does not follow it). No JavaScript, no network: it works from ``file://``."""

from __future__ import annotations

import html
import os
import posixpath

from sphinx.application import Sphinx
from sphinx.errors import ConfigError

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Moved: {title}</title>
<meta http-equiv="refresh" content="0; url={target}">
<link rel="canonical" href="{target}">
</head><body><p>This chapter moved to <a href="{target}">{target}</a>.</p></body></html>
"""


def _write(app: Sphinx, exc) -> None:
    if exc is not None or app.builder.format != "html":
        return
    for old, new in app.config.auxnb_redirects.items():
        if new not in app.env.all_docs:
            raise ConfigError(f"auxnb_redirects: {old!r} points at {new!r}, which is not a page of the book")
        if old in app.env.all_docs:
            raise ConfigError(f"auxnb_redirects: {old!r} is still a page of the book; remove the redirect")
        target = posixpath.relpath(new, posixpath.dirname(old) or ".") + ".html"
        path = os.path.join(app.outdir, *old.split("/")) + ".html"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(PAGE.format(title=html.escape(new), target=html.escape(target, quote=True)))


def setup(app: Sphinx) -> dict:
    app.add_config_value("auxnb_redirects", {}, "html", types=[dict])
    app.connect("build-finished", _write)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
