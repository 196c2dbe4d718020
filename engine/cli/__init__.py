"""The command line: argparse commands (main), the jobs they run, configuration, reports."""
from engine.cli.main import main

__all__ = ["main"]
