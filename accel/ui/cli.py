"""The `accel ui` subcommand; `accel.cli` registers it with `add_ui_command(subparsers)`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_ui_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `accel ui` (serve the web UI) on an argparse subparsers object and return its parser."""
    ui = subparsers.add_parser("ui", help="serve the web UI (Gradio) on this machine")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    ui.add_argument(
        "--output-dir", default="outputs/ui", help="folder for videos and mask pictures (default ./outputs/ui)"
    )
    ui.set_defaults(func=cmd_ui)
    return ui


def cmd_ui(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    # Gradio reads GRADIO_TEMP_DIR when it is imported: keep its scratch files inside the output folder too.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(args.output_dir).expanduser().resolve() / ".gradio"))
    from accel.ui.app import launch

    launch(host=args.host, port=args.port, share=args.share, output_dir=args.output_dir)
    return 0
