"""`edgewise server`: run and administer the control plane.

`edgewise server [--db URL] [--data DIR] [--host H] [--port P]` serves; `server init`
prepares a data directory and prints the one-time admin token on its last line;
`server migrate` brings the schema to head (`--check`: only says which revision it is at
and whether an upgrade is due); `server trust-key PUB` trusts a publisher key.

`call_api` is the small HTTP helper the operator commands (token, device, deploy, audit,
model push/list/show/yank) share: it turns error envelopes into one-line `CliError`s.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli._common import (
    CliError,
    emit_json,
    finite_option,
    http_url_option,
    json_problem,
    parse_broker,
    resolve_server,
    resolve_token,
)

__all__ = ["app", "call_api"]

app = typer.Typer(
    help="Run and administer the control plane (serves when no subcommand is given).",
    invoke_without_command=True,
)

DataOpt = Annotated[
    Path,
    typer.Option("--data", envvar="EDGEWISE_DATA", help="Data directory (key, artifacts, SQLite)."),
]
DbOpt = Annotated[
    str,
    typer.Option(
        "--db", envvar="EDGEWISE_DB", help="SQLAlchemy URL; SQLite under --data if empty."
    ),
]
ServerOpt = Annotated[str | None, typer.Option("--server", help="Control-plane URL.")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Operator token.")]


def call_api(
    method: str,
    path: str,
    server: str | None,
    token: str | None,
    *,
    json_body: Any = None,
    content: bytes | None = None,
    params: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> Any:
    """Call the operator API; returns the decoded JSON body.

    Ids and names in `path` must come through `path_segment`. Redirects are not
    followed: the API answers from where it is asked, so a 3xx is an error too.

    Raises:
        CliError: a body that is not JSON, connection failures, redirects and error
            envelopes, as one line.
    """
    import httpx

    if problem := json_problem(json_body):
        raise CliError(f"cannot send the request: {problem}")
    base = resolve_server(server)
    headers = {"authorization": f"Bearer {resolve_token(token)}"}
    if content is not None:
        headers["content-type"] = "application/octet-stream"
    try:
        r = httpx.request(
            method,
            base + path,
            headers=headers,
            json=json_body,
            content=content,
            params={k: v for k, v in (params or {}).items() if v is not None},
            timeout=timeout,
            follow_redirects=False,
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise CliError(f"cannot reach {base}: {exc}") from None
    try:
        data, is_json = (r.json(), True) if r.content else (None, True)
    except ValueError:
        data, is_json = None, False
    if r.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        message = err.get("message") or r.text[:200] or r.reason_phrase
        raise CliError(f"{r.status_code} {err.get('code', 'error')}: {message}")
    if r.status_code >= 300:
        where = r.headers.get("location", "elsewhere")
        raise CliError(
            f"{r.status_code} {r.reason_phrase}: {base} redirects {method} {r.url.path} to "
            f"{where}; API calls do not follow redirects (check --server)"
        )
    if not is_json:
        raise CliError(f"{base} answered {r.status_code} with a body that is not JSON")
    return data


def _settings(data: Path, db: str, **extra: Any) -> Any:
    from edgewise.control import Settings

    data = data.resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create data directory {data}: {exc.strerror or exc}") from None
    return Settings(data_dir=data, db_url=db, **extra)


def _open(settings: Any, *, run_migrations: bool = True) -> Any:
    """The store at the settings' database, migrated to head unless told not to.

    Raises:
        CliError: the database cannot be reached, opened or written, or must not be
            migrated (a newer edgewise's, or not an edgewise database), as one line
            that names the database (password hidden) and what to do.
    """
    from edgewise.control import open_store
    from edgewise.control._migrate import SchemaError

    url = settings.database_url
    try:
        # (Each PostgreSQL connection has a 10 s connect bound: `PG_CONNECT_TIMEOUT_S`.)
        return open_store(url, run_migrations=run_migrations)
    except SchemaError as exc:
        raise CliError(f"refusing to start on {shown_url(url)}: {exc}") from None
    except Exception as exc:  # driver errors span lines; the user needs the first
        raise CliError(database_problem(exc, url)) from None


def shown_url(url: str) -> str:
    """A database URL as messages show it: password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def database_problem(exc: BaseException, url: str) -> str:
    """One line saying why the database at `url` could not be opened, and what to do."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r"^\([\w.]+\) ", "", first)  # SQLAlchemy's "(driver.Error) " prefix
    where = shown_url(url)
    if not url.startswith(("sqlite", "postgresql")) or type(exc).__name__ in {
        "ArgumentError",
        "NoSuchModuleError",
        "ModuleNotFoundError",
    }:
        return (
            f"bad database URL {where}: {first}; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DATABASE (--db or EDGEWISE_DB)"
        )
    if url.startswith("sqlite"):
        if "database is locked" in first:
            return (
                f"SQLite database {where} is locked by another process (another edgewise "
                "server, or a tool holding a write transaction): stop it and start again"
            )
        if "not a database" in first:
            return f"{where} is not a SQLite database ({first}); check --db"
        if "readonly" in first or "unable to open" in first:
            return (
                f"cannot write SQLite database {where}: {first}; the control plane needs "
                "to write the file and its directory (check permissions, read-only "
                "mounts and free space)"
            )
        return f"cannot open SQLite database {where}: {first}"
    return f"cannot use PostgreSQL database {where}: {first}"


@app.callback()
def serve(
    ctx: typer.Context,
    data: DataOpt = Path("edgewise-data"),
    db: DbOpt = "",
    host: Annotated[str, typer.Option("--host", help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Bind port.")] = 8080,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
    desired_ttl: Annotated[
        float,
        typer.Option(
            "--desired-ttl",
            callback=finite_option,
            help="Lifetime of signed desired state (s).",
            min=60,
        ),
    ] = 7 * 86400.0,
    poll_wait: Annotated[
        int, typer.Option("--poll-wait", help="Long-poll wait agents are told to use (s).", min=1)
    ] = 30,
    allow_unsigned: Annotated[
        bool, typer.Option("--allow-unsigned-models", help="Registry accepts unsigned bundles.")
    ] = False,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            envvar="EDGEWISE_MQTT",
            help="MQTT broker HOST:PORT: telemetry over MQTT, and desired-state pushes "
            "to agents started with --mqtt.",
        ),
    ] = None,
    rollout_webhook: Annotated[
        str | None,
        typer.Option(
            "--rollout-webhook",
            envvar="EDGEWISE_ROLLOUT_WEBHOOK",
            callback=http_url_option,
            help="POST rollout events an operator must hear about (paused, awaiting "
            "approval, completed, rolled back, aborted, failed) here as JSON, at least once.",
        ),
    ] = None,
) -> None:
    """Serve the control plane (migrates the database first)."""
    if ctx.invoked_subcommand is not None:
        return
    broker = parse_broker(mqtt)
    import dataclasses

    from edgewise.control import create_app
    from edgewise.control._serve import serve as serve_app
    from edgewise.control.telemetry._wiring import TelemetryConfig

    settings = _settings(
        data,
        db,
        desired_ttl_s=desired_ttl,
        poll_wait_s=poll_wait,
        allow_unsigned_models=allow_unsigned,
        rollout_webhook=rollout_webhook or "",
    )
    store = _open(settings)
    telemetry = TelemetryConfig.from_env()
    if broker is not None:
        telemetry = dataclasses.replace(telemetry, mqtt=f"{broker[0]}:{broker[1]}")
    app_ = create_app(settings, store, telemetry=telemetry)
    token = app_.state.plane.bootstrap_admin()
    if token:
        typer.echo("first start: admin token (shown once, store it now):")
        typer.echo(token)
    typer.echo(f"edgewise control plane on http://{host}:{port} (pid {os.getpid()})")
    serve_app(app_, host, port, log_level)


@app.command("init")
def init(data: DataOpt = Path("edgewise-data"), db: DbOpt = "") -> None:
    """Create the database, signing key and admin token without serving.

    The admin token is printed alone on the last line.
    """
    from edgewise.control import ControlPlane

    settings = _settings(data, db)
    store = _open(settings)
    try:
        token = ControlPlane(settings, store).bootstrap_admin()
    finally:
        store.close()
    if token is None:
        raise CliError("already initialised: the admin token was shown when it was created")
    typer.echo(f"initialised {settings.data_dir}; admin token:")
    typer.echo(token)


@app.command("migrate")
def migrate_cmd(
    data: DataOpt = Path("edgewise-data"),
    db: DbOpt = "",
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Only say which schema revision the database is at and whether this "
            "edgewise would upgrade it; change nothing (exit 1 when it would, or refuses).",
        ),
    ] = False,
) -> None:
    """Bring the database schema up to date (the server also does this at start)."""
    from edgewise.control._migrate import head_revision, schema_status

    settings = _settings(data, db)
    url, head = settings.database_url, head_revision()
    store = _open(settings, run_migrations=False)
    try:
        try:
            found, problem = schema_status(store.engine)
        except Exception as exc:
            raise CliError(database_problem(exc, url)) from None
    finally:
        store.close()
    if problem is not None:
        raise CliError(f"refusing to migrate {shown_url(url)}: {problem}")
    if found == head:
        typer.echo(f"schema is at revision {head}, the newest this edgewise knows")
        return
    if check:
        typer.echo(
            f"schema is at revision {found or 'none (empty database)'}; this edgewise "
            f"upgrades it to {head} at start (or run `edgewise server migrate`)"
        )
        raise typer.Exit(1)
    _open(settings).close()
    typer.echo(f"schema upgraded from revision {found or 'none (empty database)'} to {head}")


@app.command("trust-key")
def trust_key(
    public_key: Annotated[str, typer.Argument(help="Public key file (PEM) or base64 raw key.")],
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "",
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Trust a publisher key for model pushes (admin)."""
    b64 = _publisher_key(public_key)
    path = Path(public_key)
    result = call_api(
        "POST",
        "/api/v1/publisher-keys",
        server,
        token,
        json_body={"public_key": b64, "name": name or path.stem},
    )
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"trusted publisher key {result['key_id']}")


def _publisher_key(value: str) -> str:
    """Base64 of the raw key, from a key file or from the key itself.

    A value that decodes as a raw Ed25519 key is one (base64 may hold "/"); otherwise a
    value that holds "/" or ends in .pub or .pem names a file, missing when not found.

    Raises:
        CliError: the file is missing or unreadable, or holds no public key.
    """
    from edgewise.bundle import (
        BundleError,
        load_public_key,
        public_key_from_b64,
        public_key_to_b64,
    )

    path = Path(value)
    if path.exists():
        try:
            return public_key_to_b64(load_public_key(path))
        except (BundleError, ValueError, OSError) as exc:
            raise CliError(f"cannot read public key {path}: {exc}") from None
    try:
        return public_key_to_b64(public_key_from_b64(value))
    except BundleError:
        pass
    if "/" in value or os.sep in value or path.suffix in (".pub", ".pem"):
        raise CliError(f"no such file: {value}")
    return value  # neither a file nor a key: the server names what is wrong with it


@app.command("keys")
def list_keys(
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List trusted publisher keys."""
    rows = call_api("GET", "/api/v1/publisher-keys", server, token)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['key_id']}  {r['name']}")


def dumps(data: Any) -> str:
    """Compact JSON for table cells."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
