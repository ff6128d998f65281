"""pytest set-up for test_models.py and tests/: the repository root on sys.path, and the shared fixtures."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_FIGURES = []


@pytest.fixture
def figures():
    """Append (name, value) pairs: reported at the end of the run, not asserted."""
    return _FIGURES


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A tiny shapes set (8 train, 3 val images), generated once per run."""
    from data import shapes
    root = str(tmp_path_factory.mktemp("shapes") / "set")
    shapes.generate(root, num_train=8, num_val=3, seed=3)
    return root


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures (measured, not asserted)")
        for name, value in _FIGURES:
            terminalreporter.write_line(f"{name}: {value}")
