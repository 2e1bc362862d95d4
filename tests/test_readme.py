"""The README's own-data example runs exactly as shown (only its length is cut to a few steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    block = text.split("<!-- readme-own-data: begin -->")[1].split("<!-- readme-own-data: end -->")[0]
    return block.split("```python\n")[1].split("```")[0]


def test_readme_keeps_exactly_two_commands_at_the_top():
    head = README.read_text().split("---")[0]
    assert head.count("```bash") == 2


@pytest.mark.slow
def test_readme_own_data_example_is_under_20_lines_and_runs(monkeypatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("seaborn")
    import matplotlib

    matplotlib.use("Agg")
    code = _snippet()
    assert len(code.strip().splitlines()) < 20
    # the only change: a few lower steps instead of the README's epochs
    small, n = re.subn(r"epochs=\d+", "steps=2, eval_every=1, progress=False", code)
    assert n == 1, "the README example must train with one epochs=N (the test shortens it)"
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    scope: dict = {}
    exec(compile(small, str(README), "exec"), scope)
    results = scope["results"]
    assert set(results) == {"maoal", "jtds"}
    for r in results.values():
        assert 0.0 <= r.test_metric <= 1.0 and not r.model.training
    assert scope["results"]["maoal"].predict(scope["x"][:5]).shape == (5, 10)
    import matplotlib.pyplot as plt

    plt.close("all")
