"""`edgewise keys ...`: Ed25519 signing keys for model bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgewise.cli._common import CliError, emit_json, output_error

__all__ = ["app", "bundle_error"]

app = typer.Typer(help="Generate and list Ed25519 signing keys.", no_args_is_help=True)


def bundle_error(exc: Exception) -> CliError:
    """Turn a `BundleError` into a one-line CLI error that names its reason code."""
    reason = getattr(exc, "reason", "error")
    message = " ".join(str(exc).split())
    return CliError(f"{message} [{reason}]")


@app.command("generate")
def generate(
    name: Annotated[str, typer.Argument(help="Key name: writes NAME.key and NAME.pub.")],
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Directory for the files.")] = Path(
        "."
    ),
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Write NAME.key (private, PKCS8 PEM, mode 0600) and NAME.pub (public, PEM)."""
    from edgewise.bundle import BundleError, generate_keypair, key_id, load_public_key

    if directory.exists() and not directory.is_dir():
        raise CliError(f"{directory} is not a directory")
    try:
        key_path, pub_path = generate_keypair(name, directory)
    except BundleError as exc:
        raise bundle_error(exc) from exc
    except OSError as exc:
        raise output_error(directory, exc) from None
    kid = key_id(load_public_key(pub_path))
    if json_out:
        emit_json({"key_id": kid, "private_key": str(key_path), "public_key": str(pub_path)})
        return
    typer.echo(f"key id   {kid}")
    typer.echo(f"private  {key_path}  (mode 0600: keep it secret)")
    typer.echo(f"public   {pub_path}  (give this to devices as a trust root)")


@app.command("list")
def list_keys(
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Directory to scan.")] = Path("."),
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the public keys (*.pub) in a directory with their key ids."""
    from edgewise.bundle import BundleError, key_id, load_public_key

    if not directory.is_dir():
        raise CliError(f"{directory} is not a directory")
    rows = []
    for pub in sorted(directory.glob("*.pub")):
        try:
            kid = key_id(load_public_key(pub))
        except BundleError:
            continue  # not a key file: nothing to list
        private = pub.with_suffix(".key")
        rows.append(
            {
                "name": pub.stem,
                "key_id": kid,
                "public_key": str(pub),
                "private_key": str(private) if private.exists() else None,
            }
        )
    if json_out:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "key id", "public key", "private key")
    for row in rows:
        table.add_row(row["name"], row["key_id"], row["public_key"], row["private_key"] or "-")
    Console().print(table)
