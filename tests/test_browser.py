"""The built book as a reader meets it: headless Chromium opens pages from file:// with every host
unresolvable (no network) and checks that maths is typeset, every image loaded and the widget works.

Run after `jupyter-book build book` (tests/run.sh does). Skips with the reason when no browser or no
built book is found, unless $AUXNB_REQUIRE_BROWSER=1 (CI), where that is a failure. Screenshots go to
$AUXNB_SCREENSHOTS (default: a folder under /tmp), never into the repository.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("AUXNB_BOOK_HTML", ROOT / "book" / "_build" / "html"))
REQUIRED = os.environ.get("AUXNB_REQUIRE_BROWSER") == "1"
PAGES = {  # page -> what it must show
    "intro": {"maths": False, "widget": False},
    "notebooks/03_maoal": {"maths": True, "widget": True},
    "notebooks/06_when_auxiliary_learning_helps": {"maths": False, "widget": False},
}


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} ($AUXNB_REQUIRE_BROWSER=1: CI must run this test)")
    pytest.skip(reason)


def _browser() -> str:
    for name in (os.environ.get("AUXNB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    _unavailable("no Chromium found (Debian: apt-get install chromium; or set $AUXNB_CHROMIUM)")


class Chromium:
    """A headless Chromium driven over the DevTools protocol on a pipe (no extra packages, no port)."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="auxnb-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        args = [binary, "--headless=new", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio",
                # no network: every host name fails to resolve, so only file:// can load
                "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,900",
                f"--user-data-dir={self.profile}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root (containers, CI)
        def wire() -> None:  # Chromium reads commands on fd 3 and answers on fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=wire,
                                     close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float = 30.0, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def evaluate(self, expression: str, timeout: float = 30.0):
        result = self.call("Runtime.evaluate", session=True, timeout=timeout, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for fd in (self._r, self._w):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    if not (HTML / "intro.html").exists():
        _unavailable(f"the book is not built at {HTML} (run: jupyter-book build book)")
    chromium = Chromium(_browser())
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("AUXNB_SCREENSHOTS") or tempfile.gettempdir()) / "auxnb-book-screenshots"
    if ROOT in folder.resolve().parents:
        raise ValueError(f"screenshots must stay out of the repository, not {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# What the page shows once its scripts have run: typeset formulas, raw TeX left in the text, images.
_STATE = r"""
(() => {
  const skip = new Set(["SCRIPT", "STYLE", "PRE", "CODE", "TEXTAREA", "MJX-CONTAINER"]);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let el = node.parentElement; el; el = el.parentElement) if (skip.has(el.tagName)) return NodeFilter.FILTER_REJECT;
      return NodeFilter.FILTER_ACCEPT;
    }});
  const raw = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const t = n.textContent;
    for (const d of ["\\(", "\\[", "$$"]) if (t.includes(d)) raw.push(t.trim().slice(0, 80));
  }
  const imgs = [...document.images].map(i => ({src: i.currentSrc.slice(0, 80), complete: i.complete, width: i.naturalWidth}));
  return {
    mathjax: !!(window.MathJax && MathJax.startup),
    typeset: document.querySelectorAll("mjx-container").length,
    tex_sources: document.querySelectorAll(".math, span.math, div.math").length,
    raw: raw,
    images: imgs,
  };
})()
"""


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders_offline(browser, shots, page):
    expect = PAGES[page]
    path = HTML / f"{page}.html"
    assert path.exists(), f"{path} is missing from the built book"
    browser.open(path.as_uri())
    if expect["maths"]:
        assert browser.wait_for("!!(window.MathJax && MathJax.startup && MathJax.startup.promise)"), \
            "MathJax did not load from _static (offline)"
        browser.evaluate("MathJax.startup.promise.then(() => true)", timeout=60)
    browser.wait_for("[...document.images].every(i => i.complete)")
    state = browser.evaluate(_STATE)
    if expect["maths"]:
        assert state["tex_sources"] > 0, "the page was expected to hold formulas"
        assert state["typeset"] >= state["tex_sources"], \
            f"{state['typeset']} typeset formulas for {state['tex_sources']} TeX sources"
    assert not state["raw"], f"raw TeX delimiters left in the text: {state['raw'][:3]}"
    broken = [i for i in state["images"] if not i["complete"] or i["width"] == 0]
    assert state["images"] or page == "intro", "expected figures on this page"
    assert not broken, f"{len(broken)} of {len(state['images'])} images did not load: {broken[:3]}"
    failed = [e["params"] for e in browser.events if e.get("method") == "Network.loadingFailed"]
    requested = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent"}
    remote = sorted({u for u in requested.values() if u.startswith(("http:", "https:"))})
    assert not remote, f"the page asked the network for {remote[:5]}"
    assert not failed, f"resources failed to load: {[(requested.get(f['requestId']), f.get('errorText')) for f in failed][:5]}"
    launch = browser.evaluate("[...document.querySelectorAll('a')]"
                              ".filter(a => a.href.includes('colab.research.google.com') || a.href.includes('mybinder.org')"
                              " || a.matches('.btn-source-repository-button, .repository-button'))"
                              ".map(a => a.href)")
    url = _repository_url()
    if not url:  # no published repository: no launch or repository link may point anywhere
        assert not launch, f"links to an unpublished repository or launchers on {page}: {launch[:3]}"
    elif page.startswith("notebooks/"):
        assert any("colab" in h for h in launch) and any("mybinder" in h for h in launch), \
            f"no Colab and Binder launch links on {page}: {launch}"
        assert all(h.endswith(f"{page}.ipynb") for h in launch if "colab" in h), launch
    if expect["widget"]:
        _check_slider(browser)
    browser.screenshot(shots / (page.replace("/", "_") + ".png"))


def _repository_url() -> str:
    import sys

    sys.path.insert(0, str(ROOT / "book"))
    try:
        import notebook_setup
    finally:
        sys.path.pop(0)
    return notebook_setup.repository_url()


def _chapter_pages() -> list[str]:
    import re

    toc = (ROOT / "book" / "_toc.yml").read_text()
    return [f for f in re.findall(r"file:\s*(\S+)", toc) if f.startswith("notebooks/")]


# Display formulas wider than the column they sit in (MathJax's CHTML container, or the block around
# it, scrolls or clips what does not fit): the page, the overflow in pixels and the start of the TeX.
_OVERFLOW = r"""
(() => {
  const out = [];
  for (const c of document.querySelectorAll('mjx-container[display="true"]')) {
    const box = c.closest('div.math, .math-wrapper, .cell_output, p, section') || c.parentElement;
    const inner = c.firstElementChild ? c.firstElementChild.getBoundingClientRect().width : c.scrollWidth;
    const room = Math.min(c.clientWidth || Infinity, box.clientWidth || Infinity);
    const over = Math.max(c.scrollWidth - c.clientWidth, inner - room);
    if (over > 1) {
      const item = MathJax.startup.document.getMathItemsWithin(c)[0];
      out.push({over: Math.round(over), tex: (item ? item.math : c.textContent).trim().slice(0, 70)});
    }
  }
  return out;
})()
"""


@pytest.mark.parametrize("page", _chapter_pages() + ["intro"])
def test_no_display_formula_is_clipped_at_the_books_width(browser, page):
    path = HTML / f"{page}.html"
    assert path.exists(), f"{path} is missing from the built book"
    browser.open(path.as_uri())
    if not browser.evaluate("document.querySelectorAll('.math, div.math').length"):
        return  # no formulas on this page
    assert browser.wait_for("!!(window.MathJax && MathJax.startup && MathJax.startup.promise)"), "MathJax did not load"
    browser.evaluate("MathJax.startup.promise.then(() => true)", timeout=60)
    clipped = browser.evaluate(_OVERFLOW)
    assert not clipped, f"{len(clipped)} display formula(s) wider than the text column on {page}: {clipped[:3]}"


def test_citations_of_different_papers_read_differently(browser):
    """MAOAL and JTDS are both Chen et al. 2022: the in-text labels must tell them apart."""
    labels: dict[str, set[str]] = {}
    for page in ["intro"] + _chapter_pages():
        path = HTML / f"{page}.html"
        if not path.exists():
            continue
        browser.open(path.as_uri())
        pairs = browser.evaluate("[...document.querySelectorAll('a.reference.internal')]"
                                 ".filter(a => /bibliography\\.html#id/.test(a.getAttribute('href') || '')"
                                 " && /\\d/.test(a.textContent))"  # the label part: a number (or a year)
                                 ".map(a => [a.getAttribute('href').split('#').pop(), a.textContent.trim()])")
        for target, text in pairs:
            labels.setdefault(text, set()).add(target)
    assert labels, "no citations found in the built pages"
    shared = {text: targets for text, targets in labels.items() if len(targets) > 1}
    assert not shared, f"one in-text label for several references: {shared}"


def _check_slider(browser) -> None:
    rendered = browser.wait_for("document.querySelectorAll('.widget-subarea .widget-slider').length", timeout=30)
    assert rendered, "the widget manager did not render the importance slider (widget state or manager missing)"
    assert not browser.evaluate("document.querySelectorAll('.widget-subarea .jupyter-widgets-disconnected"
                                " .widget-error, .jupyter-widgets .jp-RenderedText[data-mime-type*=error]').length")
    visible = ("(() => { const s = document.querySelector('.widget-subarea .widget-stack, .widget-subarea .widget-container .widget-container');"
               " const img = [...document.querySelectorAll('.widget-subarea img')].find(i => i.offsetParent !== null);"
               " return img ? img.src.length + ':' + img.src.slice(-60) : null; })()")
    before = browser.wait_for(visible)
    assert before, "the slider shows no figure"
    browser.evaluate("document.querySelector('.widget-subarea .noUi-handle').scrollIntoView({block: 'center'})")
    browser.evaluate("document.querySelector('.widget-subarea .noUi-handle').focus()")
    for _ in range(3):  # noUiSlider's keyboard support: three steps back in training time
        for kind in ("keyDown", "keyUp"):
            browser.call("Input.dispatchKeyEvent", session=True, type=kind, key="ArrowLeft", code="ArrowLeft",
                         windowsVirtualKeyCode=37, nativeVirtualKeyCode=37)
    after = browser.wait_for(f"(() => {{ const v = {visible}; return v !== {json.dumps(before)} ? v : null; }})()",
                             timeout=10)
    assert after, "moving the slider did not change the figure (the slider only works with a kernel)"
