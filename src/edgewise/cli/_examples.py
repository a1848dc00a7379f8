"""`edgewise examples build`: the example model bundles, trained and signed locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgewise.cli._common import CliError, emit_json
from edgewise.cli._keys import bundle_error

__all__ = ["app"]

app = typer.Typer(help="Build the example model bundles.", no_args_is_help=True)


@app.command("build")
def build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path(
        "examples-out"
    ),
    key: Annotated[
        Path | None,
        typer.Option("--key", "-k", help="Private key (default: OUT/examples.key, generated)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Train the example models (digits MLP, int8, regressed, logreg, ppocr-cls) and sign them."""
    from edgewise.bundle import BundleError, key_id, load_public_key, read_manifest
    from edgewise.examples import EXAMPLE_KEY_NAME, build_examples

    if out.exists() and not out.is_dir():
        raise CliError(f"{out} exists and is not a directory")
    try:
        bundles = build_examples(out, key)
    except BundleError as exc:
        raise bundle_error(exc) from exc
    pub = out / f"{EXAMPLE_KEY_NAME}.pub"
    kid = key_id(load_public_key(pub))
    rows: list[dict[str, str | int | float | None]] = []
    for ref, path in bundles.items():
        metrics = read_manifest(path).provenance.metrics
        rows.append(
            {
                "ref": ref,
                "path": str(path),
                "size": path.stat().st_size,
                "accuracy": metrics.get("accuracy"),
            }
        )
    if json_out:
        emit_json({"key_id": kid, "public_key": str(pub), "bundles": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("bundle", "file", "bytes", "test accuracy", title=f"signed by key {kid}")
    for row in rows:
        acc = row["accuracy"]
        shown = "-" if acc is None else f"{float(acc):.3f}"
        table.add_row(str(row["ref"]), str(row["path"]), str(row["size"]), shown)
    Console(width=max(Console().width, 110)).print(table)
    typer.echo(f"trust root: {pub}")
