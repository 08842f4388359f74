"""The `accel ui` subcommand; `accel.cli` registers it with `add_ui_command(subparsers)`."""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path


def _port(text: str) -> int:
    """argparse `type=` for --port: a whole number from 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be a whole number from 1 to 65535, got {text!r}")
    return value


def add_ui_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `accel ui` (serve the web UI) on an argparse subparsers object and return its parser."""
    ui = subparsers.add_parser(
        "ui", help="serve the web UI (Gradio) on this machine", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve the web UI (Gradio) on this machine.",
    )
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    ui.add_argument("--port", type=_port, default=7860, help="TCP port to serve on, 1 to 65535")
    ui.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    ui.add_argument("--output-dir", default="outputs/ui", help="folder for videos and mask pictures")
    from accel.pipelines.generate import DEFAULT_MODEL

    ui.add_argument("--model", default=DEFAULT_MODEL,
                    help="the model selected when the page opens (accel-demo, a tiny-* model, a Hub id or folder)")
    ui.set_defaults(func=cmd_ui)
    return ui


def check_port_free(host: str, port: int) -> None:
    """Bind (host, port) once, as the server will, and raise a one-line ValueError when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"cannot serve on host {host!r}: {err.strerror}; pass --host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use; pass --port") from None
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; pass --host or --port") from None


def cmd_ui(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    check_port_free(args.host, args.port)
    # Gradio reads GRADIO_TEMP_DIR and matplotlib MPLCONFIGDIR when imported: keep their scratch files
    # inside the output folder too (the UI writes nowhere else).
    out = Path(args.output_dir).expanduser().resolve()
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out / ".gradio"))
    os.environ.setdefault("MPLCONFIGDIR", str(out / ".scratch" / "matplotlib"))
    from accel.ui.app import launch

    launch(host=args.host, port=args.port, share=args.share, output_dir=args.output_dir, model=args.model)
    return 0
