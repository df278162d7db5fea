"""Export a finished run as a merged model, and predict with it (``inflora export`` / ``inflora predict``)."""

from __future__ import annotations

import argparse


def add_export_commands(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` and ``predict`` subcommands (filled in by the export work)."""
