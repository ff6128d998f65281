"""pytest set-up: the repo root on sys.path, and `figures`: measured numbers printed in the summary."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_FIGURES = []


@pytest.fixture
def figures():
    """Append (name, value) pairs: reported at the end of the run, not asserted."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures (measured, not asserted)")
        for name, value in _FIGURES:
            terminalreporter.write_line(f"{name}: {value}")
