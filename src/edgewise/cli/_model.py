"""`edgewise model pack|sign|verify|inspect|schema`: model bundles on the local disk.

The registry commands (push, list, show, yank) are registered onto the same `app` by
`edgewise.cli._registry`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli._common import CliError, emit_json, output_error, write_output
from edgewise.cli._keys import bundle_error

__all__ = ["app"]

app = typer.Typer(
    help="Model bundles (.ewb): pack, sign, verify, inspect; push, list, show, yank.",
    no_args_is_help=True,
)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


@app.command("pack")
def pack(
    src_dir: Annotated[Path, typer.Argument(help="Directory with manifest.json and the files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write (.ewb).")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Pack DIR into a bundle, filling in each file's sha256 and size."""
    from edgewise.bundle import BundleError, manifest_digest
    from edgewise.bundle import pack as pack_bundle

    try:
        manifest = pack_bundle(src_dir, out)
    except BundleError as exc:
        raise bundle_error(exc) from exc
    except OSError as exc:  # the source is read through BundleError: this is the output
        raise output_error(out, exc) from None
    digest = manifest_digest(manifest)
    if json_out:
        emit_json(
            {
                "bundle": str(out),
                "ref": manifest.ref,
                "digest": digest,
                "files": len(manifest.files),
                "size": manifest.total_size,
            }
        )
        return
    typer.echo(
        f"packed {manifest.ref} -> {out}: {len(manifest.files)} file(s), "
        f"{_size(manifest.total_size)}, manifest digest {digest}"
    )


@app.command("sign")
def sign(
    bundle: Annotated[Path, typer.Argument(help="Bundle file (.ewb), changed in place.")],
    key: Annotated[
        Path, typer.Option("--key", "-k", help="Private key file (NAME.key, mode 0600).")
    ],
) -> None:
    """Add a detached Ed25519 signature over the manifest digest."""
    from edgewise.bundle import BundleError, load_private_key, read_manifest
    from edgewise.bundle import sign as sign_bundle

    try:
        private = load_private_key(key)
        kid = sign_bundle(bundle, private)
        ref = read_manifest(bundle).ref
    except BundleError as exc:
        raise bundle_error(exc) from exc
    typer.echo(f"signed {ref} ({bundle}) with key {kid}")


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle file (.ewb).")],
    trust: Annotated[
        list[Path], typer.Option("--trust", "-t", help="Trusted public key (repeat).")
    ],
    threshold: Annotated[int, typer.Option("--threshold", "-n", help="Signatures required.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Verify signatures, file list, sizes and hashes; exit 0 only when all hold."""
    from edgewise.bundle import BundleError, load_public_key
    from edgewise.bundle import verify as verify_bundle

    if threshold < 1:
        raise CliError("--threshold must be at least 1")
    try:
        keys = [load_public_key(p) for p in trust]
        if threshold > len(keys):
            raise CliError(f"--threshold {threshold} is more than the {len(keys)} trusted key(s)")
        checked = verify_bundle(bundle, keys, threshold)
    except BundleError as exc:
        raise bundle_error(exc) from exc
    if json_out:
        emit_json(
            {
                "valid": True,
                "bundle": str(bundle),
                "ref": checked.manifest.ref,
                "digest": checked.digest,
                "signers": list(checked.signers),
            }
        )
        return
    typer.echo(
        f"ok: {checked.manifest.ref} verified ({len(checked.manifest.files)} file(s), "
        f"signed by {', '.join(checked.signers)}; digest {checked.digest})"
    )


def _inspection(bundle: Path) -> dict[str, Any]:
    import zipfile

    from edgewise.bundle import manifest_digest, read_manifest

    manifest = read_manifest(bundle)
    with zipfile.ZipFile(bundle) as zf:
        signers = sorted(
            n.removeprefix("signatures/").removesuffix(".sig")
            for n in zf.namelist()
            if n.startswith("signatures/")
        )
    return {
        "bundle": str(bundle),
        "digest": manifest_digest(manifest),
        "signatures": signers,
        "manifest": manifest.model_dump(mode="json", exclude_unset=True),
    }


@app.command("inspect")
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle file (.ewb).")],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the manifest and signatures.")
    ] = False,
) -> None:
    """Show a bundle's manifest and signatures (nothing is verified: use `verify`)."""
    from edgewise.bundle import BundleError

    try:
        info = _inspection(bundle)
    except BundleError as exc:
        raise bundle_error(exc) from exc
    if json_out:
        emit_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    m = info["manifest"]
    table = Table(title=f"{m['name']}@{m['version']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    metrics = m.get("provenance", {}).get("metrics", {})
    rows = [
        ("format", m["format"]),
        ("model", m["model"]),
        ("digest", info["digest"]),
        ("signatures", ", ".join(info["signatures"]) or "none (unsigned)"),
        ("inputs", "; ".join(_tensor(t) for t in m["inputs"])),
        ("outputs", "; ".join(_tensor(t) for t in m["outputs"])),
        ("labels", ", ".join(m.get("labels", [])) or "-"),
        ("label schema", _label_schema(m)),
        ("requires", ", ".join(f"{k}={v}" for k, v in m["requires"].items())),
        ("health", f"{len(m.get('health', {}).get('samples', []))} sample(s)"),
        ("metrics", ", ".join(f"{k}={v:g}" for k, v in metrics.items()) or "-"),
    ]
    for path, entry in m["files"].items():
        rows.append((f"file {path}", f"{_size(entry['size'])} sha256 {entry['sha256'][:16]}..."))
    for key, value in rows:
        table.add_row(key, str(value))
    Console(width=max(100, Console().width)).print(table)


def _tensor(t: dict[str, Any]) -> str:
    return f"{t['name']} {t['dtype']}[{', '.join(str(d) for d in t['shape'])}]"


def _label_schema(m: dict[str, Any]) -> str:
    schema = m.get("label_schema")
    return f"{schema['id']} v{schema['version']}" if schema else "-"


@app.command("schema")
def schema(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if OUT is not current.")] = False,
) -> None:
    """Print or write the manifest's JSON Schema (docs/manifest.schema.json)."""
    from edgewise.bundle._schema import manifest_json_schema_text

    text = manifest_json_schema_text()
    if out is None:
        if check:
            raise CliError("--check needs --out FILE")
        typer.echo(text, nl=False)
        return
    if check:
        try:
            current = out.read_text(encoding="utf-8") if out.is_file() else ""
        except (OSError, UnicodeDecodeError):
            current = ""  # unreadable is not current either
        if current != text:
            raise CliError(f"{out} is out of date: run edgewise model schema -o {out}")
        typer.echo(f"{out} is current")
        return
    write_output(out, text, parents=True)
    typer.echo(f"wrote {out}")
