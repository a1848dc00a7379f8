"""The `edgewise` command: one program, subcommands by area.

Each area lives in its own private module that exposes a Typer `app` (or a single
command function). Modules import heavy dependencies (onnxruntime, FastAPI, SQLAlchemy)
inside their commands so that `edgewise --help` stays fast.
"""

from __future__ import annotations

import os
import sys

import typer

from edgewise.cli import (
    _agent,
    _alerts,
    _audit,
    _demo,
    _deploy,
    _device,
    _drift,
    _examples,
    _fleet,
    _keys,
    _model,
    _registry,
    _rollout,
    _server,
    _sim,
    _token,
    _trust,
)
from edgewise.cli._common import CliError

_ = _registry  # registers push/list/show/yank onto the model app

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgewise",
    help="edgewise: signed model bundles, device agents and staged model rollouts for edge fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(_server.app, name="server")
app.command("agent")(_agent.agent)
app.command("demo")(_demo.demo)
app.add_typer(_keys.app, name="keys")
app.add_typer(_trust.app, name="trust")
app.add_typer(_model.app, name="model")
app.add_typer(_examples.app, name="examples")
app.add_typer(_token.app, name="token")
app.add_typer(_device.app, name="device")
app.add_typer(_deploy.app, name="deploy")
app.add_typer(_rollout.app, name="rollout")
app.add_typer(_audit.app, name="audit")
app.command("sim")(_sim.sim)
app.add_typer(_fleet.app, name="fleet")
app.add_typer(_drift.app, name="drift")
app.add_typer(_alerts.app, name="alerts")


def main() -> None:
    """Run the CLI; turn any error into a one-line message and a non-zero exit.

    Set EDGEWISE_DEBUG=1 to see the full traceback of an unexpected error.
    """
    # onnxruntime starts its own usage telemetry at import (a thread, a store under ~/.cache,
    # upload attempts): an edge device must not phone home unasked. Set it to 0 to opt in.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        # Without standalone mode click returns (rather than raises) the code of a
        # `typer.Exit` raised inside a command; carry it to the process exit status.
        rv = app(standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            sys.exit(rv)
    except CliError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: never show a traceback
        # Usage errors (bad option values) come from click, or from the copy of click that
        # newer Typer versions vendor: both carry `show()` and `exit_code`.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        if os.environ.get("EDGEWISE_DEBUG"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
