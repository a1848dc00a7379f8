"""`edgewise audit list|verify|export`.

`audit export` writes JSON lines that `audit verify --file` checks offline, with no
server: the links and hashes of every record, and, given `--head` (the `head` an
earlier `audit verify --json` printed, kept somewhere else), that the export still
reaches that record, so records cut from the end are caught too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli._common import CliError, emit_json, write_output
from edgewise.cli._server import ServerOpt, TokenOpt, call_api
from edgewise.control._auditchain import verify_chain

__all__ = ["app"]

app = typer.Typer(help="The audit chain: list, verify, export.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command("list")
def list_(
    after: Annotated[int, typer.Option("--after", help="Only records after this id.")] = 0,
    limit: Annotated[int, typer.Option("--limit")] = 100,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List audit records."""
    rows = call_api("GET", "/api/v1/audit", server, token, params={"after": after, "limit": limit})
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        typer.echo(f"{r['id']:>6}  {at}  {r['actor']}  {r['action']}  {r['object']}  {r['result']}")


def _fetch_all(server: str | None, token: str | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after = 0
    while True:
        page = call_api(
            "GET", "/api/v1/audit", server, token, params={"after": after, "limit": 10000}
        )
        rows += page
        if len(page) < 10000:
            return rows
        after = page[-1]["id"]


def _read_export(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            raise CliError(f"{path}:{number}: not a JSON record") from None
    return records


def check_records(records: list[Any], head: str | None) -> dict[str, Any]:
    """Verify exported records offline: the same answer `GET /audit/verify` gives."""
    broken = verify_chain(records, head=head, appended_since_head=True)
    result: dict[str, Any] = {"records": len(records), "ok": broken is None}
    if broken is None:
        if records:
            result["head"] = records[-1]["hash"]
        return result
    result["first_broken_index"] = broken
    if broken < len(records):
        where = records[broken].get("id") if isinstance(records[broken], dict) else None
        result["first_broken_id"] = where
        result["message"] = f"chain broken at record {where} (position {broken})"
    else:
        result["message"] = f"the chain does not reach head {head}: records missing at the end"
    return result


@app.command("verify")
def verify(
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Check an `audit export` file offline (no server)."),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            help="A head hash kept from an earlier verify: the chain must still reach it.",
        ),
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the hash chain; exits 1 naming the first broken record."""
    if file is not None:
        result = check_records(_read_export(file), head)
    else:
        result = call_api("GET", "/api/v1/audit/verify", server, token)
        if result["ok"] and head is not None:
            result = check_records(_fetch_all(server, token), head)
    if as_json:
        emit_json(result)
    if not result["ok"]:
        raise CliError(result["message"])
    if not as_json:
        typer.echo(f"audit chain intact ({result['records']} records)")


@app.command("export")
def export(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File (default stdout).")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Export every record as JSON lines (`audit verify --file` checks them offline)."""
    lines = [json.dumps(r, sort_keys=True) for r in _fetch_all(server, token)]
    text = "\n".join(lines) + ("\n" if lines else "")
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_output(out, text)
        typer.echo(f"wrote {len(lines)} records to {out}")
