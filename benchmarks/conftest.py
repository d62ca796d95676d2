"""pytest setup for benchmarks/: collect ``bench_*.py`` as test modules.

The project's pytest settings collect ``test_*.py`` only (and from tests/ when no path is given); this hook adds
the benchmark files when ``benchmarks/`` is named, without a pyproject change. The helper modules (run.py,
providers.py, ...) match neither pattern and are never collected.
"""

import pytest


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself, whatever its name: not twice
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
