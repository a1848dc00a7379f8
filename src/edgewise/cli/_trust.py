"""`edgewise trust ...`: the fleet's signed trust root (which publisher keys devices accept).

`sign` and `verify` run offline, where the root keys are kept; `push` and `show` talk
to the control plane. See `edgewise.protocol._trust` for the rules a device applies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli._common import CliError, emit_json, output_error
from edgewise.cli._server import ServerOpt, TokenOpt, call_api

__all__ = ["app"]

app = typer.Typer(
    help="The signed trust root: which publisher keys devices accept; rotate and revoke.",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise CliError(f"{path} is not a trust root: nested too deeply") from None


def _keys(paths: list[Path], private: bool) -> list[Any]:
    from edgewise.bundle import BundleError, load_private_key, load_public_key

    try:
        return [load_private_key(p) if private else load_public_key(p) for p in paths]
    except BundleError as exc:
        raise CliError(" ".join(str(exc).split())) from None


def _previous(path: Path | None) -> Any:
    """The trust root --previous names, checked by itself (None without one)."""
    from edgewise.protocol import TrustRootError, verify_trust_root

    if path is None:
        return None
    try:
        return verify_trust_root(_read(path), None)
    except TrustRootError as exc:
        raise CliError(f"--previous {path} is not a trust root to chain on: {exc}") from None


def _summary(root: Any) -> dict[str, Any]:
    return {
        "version": root.version,
        "threshold": root.threshold,
        "root_keys": sorted(root.root_keys),
        "publishers": sorted(root.publishers),
        "control_plane": sorted(root.control_plane) or None,
    }


@app.command("sign")
def sign(
    version: Annotated[
        int, typer.Option("--version", min=1, max=2**53 - 1, help="This version (from 1).")
    ],
    publisher: Annotated[
        list[Path], typer.Option("--publisher", help="A publisher public key (.pub); repeat.")
    ],
    sign_with: Annotated[
        list[Path],
        typer.Option(
            "--sign-with",
            help="A root private key (.key) to sign with; repeat. The keys of the version "
            "devices hold now, and of this one when they change.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the trust root.")],
    root: Annotated[
        list[Path] | None,
        typer.Option("--root", help="A root public key of this version; default: --sign-with's."),
    ] = None,
    threshold: Annotated[
        int, typer.Option("--threshold", min=1, help="Root signatures the next version needs.")
    ] = 1,
    control_plane: Annotated[
        list[Path] | None,
        typer.Option(
            "--control-plane",
            help="A control-plane public key devices should accept desired documents from "
            "(repeat; default: not named, devices keep theirs). `trust show --json` gives "
            "the one the control plane signs with.",
        ),
    ] = None,
    previous: Annotated[
        Path | None,
        typer.Option("--previous", help="The version devices hold now: checked to chain on."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a signed trust root naming the publishers devices should accept."""
    from edgewise.protocol import (
        TrustRootError,
        sign_trust_root,
        trust_root_document,
        verify_trust_root,
    )

    signers = _keys(sign_with, private=True)
    roots = _keys(root, private=False) if root else [k.public_key() for k in signers]
    doc = trust_root_document(
        version,
        roots,
        threshold,
        _keys(publisher, private=False),
        time.time(),
        control_plane=_keys(control_plane, private=False) if control_plane else (),
    )
    signed = sign_trust_root(doc, signers)
    try:
        held = _previous(previous)
        checked = verify_trust_root(signed, held)
    except TrustRootError as exc:
        raise CliError(f"not written: {exc}") from None
    try:
        out.write_text(json.dumps(signed, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise output_error(out, exc) from None
    if as_json:
        emit_json(_summary(checked) | {"path": str(out)})
        return
    typer.echo(
        f"trust root v{checked.version}: {len(checked.publishers)} publisher key(s), "
        f"{checked.threshold} of {len(checked.root_keys)} root key(s) -> {out}"
    )


@app.command("verify")
def verify(
    path: Annotated[Path, typer.Argument(help="A signed trust root (JSON).")],
    previous: Annotated[
        Path | None, typer.Option("--previous", help="The version it must chain on from.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a trust root as a device would; exit 0 only when it would be accepted."""
    from edgewise.protocol import TrustRootError, verify_trust_root

    try:
        held = _previous(previous)
        root = verify_trust_root(_read(path), held)
    except TrustRootError as exc:
        raise CliError(f"refused: {exc}") from None
    if as_json:
        emit_json(_summary(root))
        return
    typer.echo(f"ok: trust root v{root.version}")
    typer.echo(f"  root keys ({root.threshold} needed): {', '.join(sorted(root.root_keys))}")
    typer.echo(f"  publishers: {', '.join(sorted(root.publishers))}")
    if root.control_plane:
        typer.echo(f"  control plane: {', '.join(sorted(root.control_plane))}")


@app.command("push")
def push(
    path: Annotated[Path, typer.Argument(help="A signed trust root (`trust sign`).")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make it the fleet's: devices take it with their next desired document."""
    result = call_api("POST", "/api/v1/trust-root", server, token, json_body=_read(path))
    if as_json:
        emit_json(result)
        return
    typer.echo(f"trust root v{result['version']}: publishers {', '.join(result['publishers'])}")


@app.command("show")
def show(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The fleet's trust root and how many devices hold each version."""
    result = call_api("GET", "/api/v1/trust-root", server, token)
    if as_json:
        emit_json(result)
        return
    version = result["version"]
    typer.echo(f"trust root v{version}" if version else "no signed trust root yet")
    typer.echo(f"publishers: {', '.join(sorted(result['publishers'])) or '-'}")
    if result.get("control_plane"):
        typer.echo(f"control plane keys: {', '.join(sorted(result['control_plane']))}")
    typer.echo(f"signing with: {result['signing_key']['key_id']}")
    held = ", ".join(f"v{v}: {n}" for v, n in sorted(result["devices"].items()))
    typer.echo(f"devices by version held: {held or '-'}")
