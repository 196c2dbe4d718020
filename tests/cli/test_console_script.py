"""The installed console script has a name no other package is likely to use; ``python -m
engine`` runs the same main."""
import os
import subprocess
import sys
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DISTRIBUTION = "parallel-cpu-engine"


def test_console_script_is_named_after_the_distribution_not_engine():
    try:
        scripts = {entry.name: entry.value for entry in
                   metadata.distribution(DISTRIBUTION).entry_points
                   if entry.group == "console_scripts"}
    except metadata.PackageNotFoundError:
        pytest.skip(f"{DISTRIBUTION} is not installed (pip install -e .)")
    assert scripts == {DISTRIBUTION: "engine.cli.main:main"}


def test_python_dash_m_engine_still_runs_the_command_line():
    child = subprocess.run([sys.executable, "-m", "engine", "predict", "--help"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert child.returncode == 0, child.stderr
    assert "--checkpoint" in child.stdout and "--output" in child.stdout
