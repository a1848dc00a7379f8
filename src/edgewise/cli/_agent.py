"""`edgewise agent`: the device agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgewise.cli._common import (
    DAY_S,
    CliError,
    finite_option,
    http_url,
    off_or_range,
    parse_broker,
)

# Bounds of the numeric options: past them a value is a typo, not a setting. Far past them
# (1e300) the clock arithmetic and the 64-bit byte counts overflow.
MAX_BUSY_POLL_US = 100_000.0  # 0.1 s: the window exists to save tens of microseconds
MIN_TELEMETRY_BUDGET_MB = 0.1  # a budget smaller than a few records drops every record
MAX_TELEMETRY_BUDGET_MB = 1024.0 * 1024.0  # 1 TiB
MAX_TELEMETRY_RATE = 1_000_000.0
MIN_TELEMETRY_RATE = 0.01  # slower, and one batch's wait grows past hours
MAX_DISK_RESERVE_MB = 1e12  # about an exabyte; the byte count still fits in 64 bits


def _labels(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CliError(f"bad label {part!r}: use k=v,k2=v2")
        out[key.strip()] = value.strip()
    return out


def _data_dir(value: str | Path) -> Path:
    """The `--data` directory, refused when empty or when it (or a parent) is a file."""
    if not str(value):
        raise CliError("--data must not be empty")
    path = Path(value)
    for where in (path, *path.parents):  # the nearest that exists must be a directory
        if where.is_dir():
            break
        if where == path and where.exists():
            raise CliError(f"--data {value} is a file, not a directory")
        if where.exists():
            raise CliError(f"--data {value}: {where} is a file, not a directory")
    return path


def _server_url(value: str | None) -> str | None:
    """The `--server` URL, refused unless it is http(s)://HOST.

    An agent given "notaurl" said it was running and stayed offline, with nothing in its
    status to say why.
    """
    return None if value is None else http_url(value, "--server")


def agent(
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            callback=_server_url,
            help="Control-plane URL (first start).",
        ),
    ] = None,
    enroll_token: Annotated[
        str | None, typer.Option("--enroll-token", help="Enrollment token (first start only).")
    ] = None,
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            # Parsed here, not by click: click turns "" into Path("."), the current directory.
            parser=_data_dir,
            help="Agent data directory (identity, models, telemetry).",
        ),
    ] = Path("edgewise-agent"),
    labels: Annotated[
        str | None, typer.Option("--labels", help="Device labels: k=v,k2=v2.")
    ] = None,
    local_port: Annotated[
        int | None,
        typer.Option(
            "--local-port",
            min=0,
            max=65535,
            help="Serve /healthz, /status and inference on 127.0.0.1:P (0: any).",
        ),
    ] = None,
    local_busy_poll: Annotated[
        float,
        typer.Option(
            "--local-busy-poll-us",
            callback=finite_option,
            min=0.0,
            max=MAX_BUSY_POLL_US,
            help="After an answer, poll on this long while an app calls back-to-back "
            "(lower latency for a little CPU; 0: off).",
        ),
    ] = 100.0,
    poll_wait: Annotated[
        float | None,
        typer.Option(
            "--poll-wait",
            callback=off_or_range(1.0, DAY_S, "seconds"),
            help="Long-poll wait in seconds, 1 to a day; 0: no long-poll, poll every "
            "--poll-interval (default: server setting).",
        ),
    ] = None,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            callback=finite_option,
            min=1.0,
            max=DAY_S,
            help="Poll period in seconds when --poll-wait is 0 (no long-poll).",
        ),
    ] = 60.0,
    mqtt: Annotated[
        str | None, typer.Option("--mqtt", help="MQTT broker HOST:PORT for wake-ups.")
    ] = None,
    telemetry_budget_mb: Annotated[
        float,
        typer.Option(
            "--telemetry-budget-mb",
            callback=finite_option,
            min=MIN_TELEMETRY_BUDGET_MB,
            max=MAX_TELEMETRY_BUDGET_MB,
            help="Byte budget of the telemetry buffer.",
        ),
    ] = 32.0,
    telemetry_rate: Annotated[
        float,
        typer.Option(
            "--telemetry-rate",
            callback=finite_option,
            min=MIN_TELEMETRY_RATE,
            max=MAX_TELEMETRY_RATE,
            help="Backlog drain rate, records per second.",
        ),
    ] = 1000.0,
    disk_reserve_mb: Annotated[
        float,
        typer.Option(
            "--disk-reserve-mb",
            callback=finite_option,
            min=0.0,
            max=MAX_DISK_RESERVE_MB,
            help="Free disk an install must leave untouched.",
        ),
    ] = 0.0,
    metrics_interval: Annotated[
        float | None,
        typer.Option(
            "--metrics-interval",
            callback=finite_option,
            min=1.0,
            max=DAY_S,
            help="Seconds between metric records.",
        ),
    ] = None,
) -> None:
    """Run the device agent: enroll, reconcile, serve models, buffer telemetry."""
    import signal
    import threading

    from edgewise.agent import Agent, AgentConfig
    from edgewise.agent._identity import IdentityError

    config = AgentConfig(
        data_dir=data,
        server=server.rstrip("/") if server else None,
        enroll_token=enroll_token,
        labels=_labels(labels),
        local_port=local_port,
        local_busy_poll_us=local_busy_poll,
        poll_wait_s=poll_wait,
        poll_interval_s=poll_interval,
        metrics_interval_s=metrics_interval,
        telemetry_budget_bytes=int(telemetry_budget_mb * 1024 * 1024),
        telemetry_rate=telemetry_rate,
        disk_reserve_mb=disk_reserve_mb,
        mqtt=parse_broker(mqtt),
        log_events=True,
    )
    stop = threading.Event()
    running: list[Agent] = []

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if running:  # a long-poll in flight is cut short (this runs in run's thread)
            running[0].on_stop_signal()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner = Agent(config)
    except IdentityError as exc:
        raise CliError(str(exc)) from exc
    running.append(runner)

    def ready(a: Agent) -> None:
        assert a.identity is not None
        where = f", local API http://127.0.0.1:{a.local_port}" if a.local_port else ""
        typer.echo(f"agent: device {a.identity.device_id} running{where}", err=True)

    try:
        runner.run(stop, ready)
    except IdentityError as exc:
        raise CliError(str(exc)) from exc
    except Exception as exc:
        code = getattr(exc, "code", None)
        if code is not None:
            raise CliError(f"control plane refused enrollment: {exc}") from exc
        raise
    finally:
        runner.close()
