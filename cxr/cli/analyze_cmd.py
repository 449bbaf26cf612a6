"""`cxr analyze FILE... [--wait] [--out DIR] [--json]`: send DICOM files to the ingestion service and show the
ensemble's findings (and, with --wait, write the explanation overlays as PNGs).

With --json, stdout carries exactly one JSON object per file and nothing else:
    {"file", "ok", "error": {"code", "reason", "message"} | null, "model": {"name", "version", "members", ...},
     "identity": {...UIDs...}, "job_id", "cached", "warnings", "notice",
     "findings": [{"label", "probability", "models": {name: p}, "votes", "n_models", "threshold", "positive"}],
     "explanation": {"status", "heatmaps": [PNG paths], "failure_reason", "agreement",
                     "dicom": [{"path", "kind", "sop_instance_uid", "description"}] (with --dicom)} (with --wait)}
With --wait, DIR/<file>/ holds per label <label>.png (overlay), <label>.disagreement.png and <label>.panel.png
(the paper's panel: both side by side), summary.png (all positive findings), and with --dicom the DICOM results
SR-findings.dcm and SC-<label>.dcm / SC-summary.dcm (Secondary Captures), in the analysed image's study.
Exit status: 0 when every file was analysed (and, with --wait, every explanation finished: done or skipped),
1 otherwise, 2 when the service address cannot be worked out (a bad CXR_* port setting) or the TLS options
cannot be used (--cert without --key, an unreadable file). A failure for one
file never stops the others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from cxr import NOT_FOR_CLINICAL_USE

DEFAULT_OUT = Path("cxr-out")
FINISHED = ("done", "skipped")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `analyze` subcommand."""
    p = sub.add_parser("analyze", help="analyse DICOM files with the running stack (NOT FOR CLINICAL USE)")
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM Part 10 files")
    p.add_argument("--wait", action="store_true", help="wait for the explanations and write overlay PNGs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default ./cxr-out)")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout, nothing else")
    p.add_argument("--address", help="ingestion HOST:PORT (default: CXR_INGESTION_ADDR, else the local stack)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call and per explanation wait")
    p.add_argument("--no-cache", action="store_true", help="analyse again even if this image was analysed before")
    p.add_argument("--dicom", action="store_true", help="with --wait: also write the DICOM results (SR + SC) to --out")
    p.add_argument(
        "--method", default="", help="explanation method: gradcam (default) or, for comparison, "
        "integrated_gradients, occlusion, guided_gradcam (slower; positive labels only)",
    )  # fmt: skip
    p.add_argument("--ca", help="PEM CA of the server's certificate: use TLS [CXR_TLS_CA]")
    p.add_argument("--cert", help="PEM client certificate, for mutual TLS [CXR_TLS_CLIENT_CERT]")
    p.add_argument("--key", help="PEM key of --cert [CXR_TLS_CLIENT_KEY]")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs (no --ca)")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse every file; print a table (or JSON line) per file. Returns 0 if all succeeded, else 1."""
    from cxr.client import IngestionClient
    from cxr.stack.errors import StackError
    from cxr.tls import ClientTLS, TlsConfigError

    try:
        address = args.address or default_address()
        tls = ClientTLS.from_values(ca=args.ca, cert=args.cert, key=args.key) or (ClientTLS() if args.tls else None)
        client = IngestionClient(address, timeout_s=args.timeout, tls=tls)
    except (StackError, TlsConfigError) as e:  # e.g. CXR_INGESTION_PORT=abc, --cert without --key
        sys.stderr.write(f"cxr analyze: {e}\n")
        return 2
    used_dirs: set[str] = set()
    all_ok = True
    with client:
        for name in args.files:
            result = analyze_file(client, Path(name), args, used_dirs)
            all_ok &= result["ok"] and (not args.wait or result["explanation"]["status"] in FINISHED)
            _emit(result, args.json)
    return 0 if all_ok else 1


def default_address() -> str:
    """CXR_INGESTION_ADDR, else the ingestion address recorded by `cxr up` in CXR_HOME, else the default port."""
    from cxr.stack.settings import StackSettings
    from cxr.stack.state import read_state

    if env := os.environ.get("CXR_INGESTION_ADDR"):
        return env
    settings = StackSettings.from_env()
    state = read_state(settings.state_file)
    if state is not None and "ingestion" in state.services:
        return state.services["ingestion"].address
    return settings.ingestion_address


def analyze_file(client: Any, path: Path, args: argparse.Namespace, used_dirs: set[str]) -> dict[str, Any]:
    """One file -> its result dict (the JSON contract above). Never raises for a failed call."""
    from cxr.client import ClientError

    result = empty_result(path)
    try:
        response = client.analyze(
            path, skip_cache=args.no_cache, client_name="cxr-cli", explanation_method=getattr(args, "method", "")
        )
    except ClientError as e:
        result["error"] = {"code": e.code, "reason": e.reason, "message": e.message}
        return result
    result.update(response_fields(response), ok=True)
    if args.wait:
        result["explanation"] = wait_and_render(client, response.job_id, args, _out_dir(args.out, path, used_dirs))
    return result


def empty_result(path: Path) -> dict[str, Any]:
    """The result of a file before (or without) an answer: every key present, ok false."""
    return {
        "file": str(path), "ok": False, "error": None, "model": None, "identity": None, "job_id": None,
        "cached": False, "warnings": [], "findings": [], "explanation": None, "notice": NOT_FOR_CLINICAL_USE,
    }  # fmt: skip


def response_fields(r: Any) -> dict[str, Any]:
    """An AnalyzeResponse -> the JSON fields model, identity, job_id, cached, warnings, findings, notice."""
    ident = r.identity
    return {
        "model": {
            "name": r.model.name, "version": r.model.version, "members": list(r.model.members),
            "ensemble_rule": r.model.ensemble_rule, "intended_use": r.model.intended_use,
        },
        "identity": {
            "study_instance_uid": ident.study_instance_uid, "series_instance_uid": ident.series_instance_uid,
            "sop_instance_uid": ident.sop_instance_uid, "modality": ident.modality,
            "view_position": ident.view_position,
        },
        "job_id": r.job_id or None, "cached": r.cached, "warnings": list(r.warnings),
        "findings": [finding_fields(f, list(r.model.members)) for f in r.findings],
        "notice": r.notice or NOT_FOR_CLINICAL_USE, "timings_ms": dict(r.timings_ms),
    }  # fmt: skip


def finding_fields(f: Any, members: list[str]) -> dict[str, Any]:
    """A Finding -> {"label", "probability", "models", "votes", "n_models", "threshold", "positive"}."""
    order = members + sorted(set(f.model_probabilities) - set(members))
    models = {m: round(float(f.model_probabilities[m]), 6) for m in order if m in f.model_probabilities}
    return {
        "label": f.label, "probability": round(float(f.probability), 6), "models": models, "votes": f.votes,
        "n_models": f.n_models, "threshold": round(float(f.threshold), 6), "positive": f.positive,
    }  # fmt: skip


def wait_and_render(client: Any, job_id: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Watch the explanation until it ends (at most --timeout), then write its overlays under ``out_dir``.

    Returns {"status", "heatmaps": [paths], "failure_reason", "agreement": {label: {...}}}."""
    from cxr.client import ClientError, job_status_name

    info: dict[str, Any] = {"status": "unknown", "heatmaps": [], "failure_reason": "", "agreement": {}, "dicom": []}
    try:
        final = client.wait_explanation(job_id, args.timeout)
        info["status"], info["failure_reason"] = job_status_name(final.status), final.failure_reason
        if info["status"] not in ("done", "failed", "skipped"):
            info["status"], info["failure_reason"] = "timeout", f"not finished after {args.timeout:g} s"
        if info["status"] == "done":
            dicom = bool(getattr(args, "dicom", False))
            explanation = client.get_explanation(job_id, render=True, dicom=dicom)
            info["heatmaps"] = write_heatmaps(explanation, out_dir)
            info["agreement"] = agreement_fields(explanation)
            if dicom:
                info["dicom"] = write_dicom_objects(explanation, out_dir)
    except ClientError as e:
        info["status"], info["failure_reason"] = "error", f"{e.code} {e.reason}: {e.message}"
    return info


def agreement_fields(explanation: Any) -> dict[str, dict[str, float]]:
    """Per label: how much the models agree on where they look (spatial agreement, mean disagreement)."""
    return {
        e.label: {
            "spatial_agreement": round(e.spatial_agreement, 4),
            "mean_disagreement": round(e.mean_disagreement, 4),
        }
        for e in explanation.labels
    }


def write_heatmaps(explanation: Any, out_dir: Path) -> list[str]:
    """Write ``<label>.png`` (fused heatmap overlay), ``<label>.disagreement.png`` and ``<label>.panel.png`` (both
    side by side) per label and ``summary.png`` (every positive finding); return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for e in explanation.labels:
        for suffix, data in ((".png", e.overlay_png), (".disagreement.png", e.disagreement_png),
                             (".panel.png", e.panel_png)):  # fmt: skip
            if data:
                path = out_dir / f"{safe_name(e.label)}{suffix}"
                path.write_bytes(data)
                paths.append(str(path))
    if explanation.summary_png:
        path = out_dir / "summary.png"
        path.write_bytes(explanation.summary_png)
        paths.append(str(path))
    return paths


def write_dicom_objects(explanation: Any, out_dir: Path) -> list[dict[str, str]]:
    """Write each DICOM result as ``<kind>-<description>.dcm`` under ``out_dir``; return their listing
    [{"path", "kind", "sop_instance_uid", "description"}], SR first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = []
    for obj in explanation.dicom_objects:
        path = out_dir / f"{obj.kind}-{safe_name(obj.description)}.dcm"
        path.write_bytes(obj.data)
        listing.append({"path": str(path), "kind": obj.kind, "sop_instance_uid": obj.sop_instance_uid,
                        "description": obj.description})  # fmt: skip
    return listing


def safe_name(label: str) -> str:
    """A label as a file name: letters, digits, '-', '_' and '.' kept, anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "label"


def _out_dir(out: Path, path: Path, used: set[str]) -> Path:
    """DIR/<file stem>, made unique within one run (two inputs with the same stem get stem-2, ...)."""
    stem, n = safe_name(path.stem), 1
    name = stem
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return out / name


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        return
    print_result(result)


# -- for people ------------------------------------------------------------------------------------
def print_result(result: dict[str, Any], console: Any = None) -> None:
    """Print a findings table (or the error) for one file."""
    from cxr.cli.stack_cmds import make_console

    console = console or make_console()
    if not result["ok"]:
        e = result["error"]
        console.print(f"[bold]{result['file']}[/bold]: [red]{e['code']} {e['reason']}[/red]: {e['message']}")
        return
    console.print(findings_table(result))
    for warning in result["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {warning}")
    ex = result.get("explanation")
    if ex is not None:
        detail = f" ({ex['failure_reason']})" if ex["failure_reason"] else ""
        console.print(f"explanation: {ex['status']}{detail}; {len(ex['heatmaps'])} PNG(s)")
        for path in ex["heatmaps"]:
            console.print(f"  {path}", highlight=False)
        for obj in ex.get("dicom", []):
            console.print(f"  {obj['path']} (DICOM {obj['kind']})", highlight=False)
    console.print(f"[bold red]{NOT_FOR_CLINICAL_USE}[/bold red]\n")


def findings_table(result: dict[str, Any]) -> Any:
    """A rich Table, one row per label: probability, each model's probability, votes "k of n", threshold,
    POSITIVE marker; the model and NOT FOR CLINICAL USE in the caption."""
    from rich.table import Table

    model = result["model"]
    members = model["members"]
    cached = " (cached)" if result["cached"] else ""
    table = Table(
        title=f"{result['file']}{cached}",
        caption=f"model {model['name']} {model['version']} - NOT FOR CLINICAL USE - job {result['job_id']}",
    )
    table.add_column("label")
    table.add_column("probability", justify="right")
    for m in members:
        table.add_column(m, justify="right", style="dim")
    table.add_column("votes", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("decision")
    for f in result["findings"]:
        per_model = [f"{f['models'][m]:.3f}" if m in f["models"] else "-" for m in members]
        decision = "[bold red]POSITIVE[/bold red]" if f["positive"] else "-"
        votes = f"{f['votes']} of {f['n_models']}"
        table.add_row(f["label"], f"{f['probability']:.3f}", *per_model, votes, f"{f['threshold']:.3f}", decision)
    return table
