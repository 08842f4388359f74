"""`accel ui`: a Gradio web page to generate with dense or sparse attention and inspect what it computes.

Gradio is imported only when the app is built, so `add_ui_command` costs nothing at CLI start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from accel.ui.cli import add_ui_command

if TYPE_CHECKING:
    import gradio as gr


def build_app(*args: Any, **kwargs: Any) -> gr.Blocks:
    """See `accel.ui.app.build_app`."""
    from accel.ui.app import build_app as _build_app

    return _build_app(*args, **kwargs)


def launch(*args: Any, **kwargs: Any) -> gr.Blocks:
    """See `accel.ui.app.launch`."""
    from accel.ui.app import launch as _launch

    return _launch(*args, **kwargs)


__all__ = ["add_ui_command", "build_app", "launch"]
