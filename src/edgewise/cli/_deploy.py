"""`edgewise deploy create|list|show|diff|delete|dry-run|stages`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edgewise.cli._common import CliError, emit_json, json_problem, path_segment
from edgewise.cli._server import ServerOpt, TokenOpt, call_api
from edgewise.protocol import stage_reference

__all__ = ["app"]

app = typer.Typer(
    help="Deployments: create, list, show, diff, delete, dry-run; the built-in stages.",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Deployment name.")]
SelectorOpt = Annotated[str | None, typer.Option("--selector", "-l", help="Target label selector.")]
PriorityOpt = Annotated[int | None, typer.Option("--priority", help="Higher wins per pipeline.")]
PipelineOpt = Annotated[
    list[str] | None,
    typer.Option("--pipeline", "-p", help="NAME=MODEL@VERSION (repeatable)."),
]
FileOpt = Annotated[
    Path | None, typer.Option("--file", "-f", help="JSON (or YAML) spec: name, selector, ...")
]
EgressOpt = Annotated[
    str | None,
    typer.Option(
        "--egress",
        help="Egress policy for the matching devices: JSON text or a JSON/YAML file "
        "(groups, redact, capture); 'none' clears it (the server's default applies).",
    ),
]


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not a text file (JSON or YAML in UTF-8)") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # nested past the parser's limit is not JSON here
        try:
            import yaml  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            raise CliError(f"{path} is not JSON (install PyYAML for YAML)") from None
        try:
            data = yaml.safe_load(text)
        except Exception as exc:
            raise CliError(f"{path} is neither JSON nor YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold an object")
    if problem := json_problem(data):
        raise CliError(f"{path}: {problem}")
    return data


def egress_value(text: str) -> dict[str, Any] | None:
    """The `--egress` argument: inline JSON, a file, or `none` (None)."""
    if text.strip().lower() == "none":
        return None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CliError(f"--egress is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CliError("--egress must be a JSON object")
        return data
    return _load(Path(text))


def _spec(
    name: str | None,
    selector: str | None,
    priority: int | None,
    pipelines: list[str] | None,
    file: Path | None,
    egress: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = _load(file) if file else {}
    if egress is not None:
        spec["egress"] = egress_value(egress)
    if name is not None:
        spec["name"] = name
    if selector is not None:
        spec["selector"] = selector
    if priority is not None:
        spec["priority"] = priority
    for item in pipelines or []:
        pname, sep, ref = item.partition("=")
        if not sep or "@" not in ref:
            raise CliError(f"--pipeline {item!r} is not NAME=MODEL@VERSION")
        if isinstance(spec.get("pipelines"), list):
            spec["pipelines"] = {p.get("name", ""): p for p in spec["pipelines"]}
        spec.setdefault("pipelines", {})[pname] = {"model": ref}
    if "name" not in spec:
        raise CliError("a deployment needs --name (or a name in --file)")
    if not spec.get("pipelines"):
        raise CliError("a deployment needs at least one --pipeline (or pipelines in --file)")
    return spec


def warn_incompatible(view: dict[str, Any], what: str) -> None:
    """Name (some of) the targeted devices that cannot run what was just stored."""
    bad = view.get("incompatible") or {}
    if not bad:
        return
    typer.echo(f"warning: {len(bad)} targeted device(s) cannot run {what}:", err=True)
    for dev, reasons in sorted(bad.items())[:10]:
        typer.echo(f"  {dev}: {'; '.join(reasons)}", err=True)
    if len(bad) > 10:
        typer.echo(f"  ... and {len(bad) - 10} more (deploy dry-run lists all)", err=True)


def _print(d: dict[str, Any]) -> None:
    typer.echo(f"{d['id']}  {d['name']}  priority={d['priority']}  selector={d['selector']!r}")
    for pname, p in d["pipelines"].items():
        m = p["model"]
        typer.echo(f"  {pname}: {m['name']}@{m['version']} sha256={m['sha256'][:16]}")
    if d.get("egress") is not None:
        typer.echo(f"  egress: {json.dumps(d['egress'], sort_keys=True)}")


@app.command("create")
def create(
    name: NameOpt = None,
    selector: SelectorOpt = None,
    priority: PriorityOpt = None,
    pipeline: PipelineOpt = None,
    file: FileOpt = None,
    egress: EgressOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a deployment (pre-flight runs first; conflicts refuse it)."""
    body = _spec(name, selector, priority, pipeline, file, egress)
    d = call_api("POST", "/api/v1/deployments", server, token, json_body=body)
    if as_json:
        emit_json(d)
        return
    _print(d)
    warn_incompatible(d, "it")


@app.command("dry-run")
def dry_run(
    name: NameOpt = None,
    selector: SelectorOpt = None,
    priority: PriorityOpt = None,
    pipeline: PipelineOpt = None,
    file: FileOpt = None,
    egress: EgressOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pre-flight only: matching devices, incompatible ones, conflicts."""
    body = _spec(name, selector, priority, pipeline, file, egress)
    r = call_api("POST", "/api/v1/deployments/dry-run", server, token, json_body=body)
    if as_json:
        emit_json(r)
    else:
        typer.echo(f"matching devices: {len(r['matching'])}")
        for dev, reasons in r["incompatible"].items():
            typer.echo(f"incompatible {dev}: {'; '.join(reasons)}")
        for c in r["conflicts"]:
            typer.echo(f"conflict: {c}")
    if r["conflicts"]:
        raise CliError(f"pre-flight found {len(r['conflicts'])} conflict(s)")


@app.command("diff")
def diff(
    name: NameOpt = None,
    selector: SelectorOpt = None,
    priority: PriorityOpt = None,
    pipeline: PipelineOpt = None,
    file: FileOpt = None,
    egress: EgressOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show how each device's pipelines would change."""
    body = _spec(name, selector, priority, pipeline, file, egress)
    r = call_api("POST", "/api/v1/deployments/diff", server, token, json_body=body)
    if as_json:
        emit_json(r)
        return
    typer.echo(f"{r['devices_changed']} device(s) would change")
    for dev, changes in r["changes"].items():
        for pname, ch in changes.items():
            typer.echo(f"  {dev} {pname}: {ch['from'] or '-'} -> {ch['to'] or '-'}")


@app.command("list")
def list_(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List deployments."""
    rows = call_api("GET", "/api/v1/deployments", server, token)
    if as_json:
        emit_json(rows)
        return
    for d in rows:
        typer.echo(
            f"{d['id']}  {d['name']:<20} prio={d['priority']:<5} {d['selector']!r}  "
            f"{','.join(d['pipelines'])}"
        )


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="Deployment id or name.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a deployment."""
    d = call_api("GET", f"/api/v1/deployments/{path_segment(ref, 'deployment')}", server, token)
    if as_json:
        emit_json(d)
        return
    _print(d)


@app.command("delete")
def delete(
    ref: Annotated[str, typer.Argument(help="Deployment id or name.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a deployment; devices fall back to the next layer."""
    call_api("DELETE", f"/api/v1/deployments/{path_segment(ref, 'deployment')}", server, token)
    typer.echo(f"deleted {ref}")


@app.command("stages")
def stages(as_json: JsonOpt = False) -> None:
    """The built-in pipeline stages and their parameters, as a server of this version checks them.

    A deployment that gives a built-in stage a parameter it does not take, or a value
    outside these bounds, is refused (422 invalid_pipeline). Read from this installation,
    no server needed.
    """
    reference = stage_reference()
    if as_json:
        emit_json(reference)
        return
    for stage in reference:
        schema = stage["params"]
        props: dict[str, Any] = schema.get("properties", {})
        title = f"{stage['kind']} {stage['type']}"
        typer.echo(f"{title:<22} {schema.get('description', '') if props else '(no parameters)'}")
        required = set(schema.get("required", []))
        for name, prop in props.items():
            typer.echo(f"    {name:<16} {_param_line(prop, name in required)}")


def _param_line(prop: dict[str, Any], required: bool) -> str:
    """`integer  default 3  >= 1, <= 100000` from a parameter's JSON Schema."""
    options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
    kinds = []
    for option in options:
        if "const" in option:
            kinds.append(repr(option["const"]))
        elif "enum" in option:
            kinds.append(" | ".join(map(repr, option["enum"])))
        elif option.get("type") == "array" and "type" in option.get("items", {}):
            kinds.append(f"{option['items']['type']}s")
        else:
            kinds.append(str(option.get("type", "any")))
    bounds = []
    for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
        for option in options:
            if key in option:
                bounds.append(f"{op} {option[key]}")
    if any(option.get("minLength") for option in options):
        bounds.append("not empty")
    if required:
        default = "required"
    elif prop.get("default") is None:
        default = "optional"
    else:
        default = f"default {json.dumps(prop['default'])}"
    line = f"{' or '.join(kinds):<18} {default}"
    return f"{line}  {', '.join(bounds)}" if bounds else line
