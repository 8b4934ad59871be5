"""Every measured number the README quotes is docs/results.md's current number.

A number counts as a measurement when it has a decimal point or a × / % sign (outside code
blocks and inline code); versions (two dots) and the few non-measurements in
:data:`NOT_MEASUREMENTS` are not.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"(?<![\w.])[+−-]?\d[\d,]*(?:\.\d+)?(?:×| ?%)?(?![\w.]*\d)")
NOT_MEASUREMENTS = {"3.11"}  # the Python version


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def measurements(text: str) -> set[str]:
    found = set()
    for match in NUMBER.finditer(prose(text)):
        token = match.group().lstrip("+−-").replace(" %", "%")
        if ("." in token or token.endswith(("×", "%"))) and token.rstrip("×%") not in NOT_MEASUREMENTS:
            found.add(token)
    return found


def test_measurements_finds_the_numbers_a_reader_would_check() -> None:
    text = "ran 352.1 vs 144.5 texts/s (2.44×), kept 73.9 % with `torch==2.13.0`, Python 3.11, v0.0.78, 2 cores\n```\nx 9.99\n```"
    assert measurements(text) == {"352.1", "144.5", "2.44×", "73.9%"}


def test_every_number_in_the_readme_is_in_results() -> None:
    readme = measurements((REPO / "README.md").read_text(encoding="utf-8"))
    results = measurements((REPO / "docs" / "results.md").read_text(encoding="utf-8"))
    assert len(readme) >= 10, "the README should quote the headline numbers"
    missing = sorted(readme - results)
    assert not missing, f"README.md quotes numbers docs/results.md does not have: {missing}"


def test_results_fits_on_a_few_screens() -> None:
    lines = (REPO / "docs" / "results.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"docs/results.md has {len(lines)} lines: move the detail to results-history.md"
