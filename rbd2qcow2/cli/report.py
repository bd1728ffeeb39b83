"""The run summary: human text, JSON, and a Prometheus textfile (node_exporter's collector)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.errors import CephUnavailable, combined_exit_code
from ..core.units import human_size
from ..ops.run import FAILED, RunReport
from ..store.fsutil import atomic_write


def summary_text(report: RunReport) -> str:
    counts = Counter(i.status for i in report.images)
    lines = [
        f"{i.cluster}  {i.image}  {i.status}"
        + (f"  {i.point} ({i.kind})" if i.point and i.kind else "")
        + (f"  {human_size(i.bytes_written)} written in {i.seconds:.1f} s" if i.kind else "")
        + (f"  {i.error}" if i.error else (f"  {i.reason}" if i.reason and i.status != "ok" else ""))
        for i in report.images
    ]
    lines += [f"error: {e}" for e in report.errors]
    totals = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no images"
    lines.append(f"run {'succeeded' if report.ok else 'FAILED'}: {totals} in {report.seconds:.1f} s")
    return "\n".join(lines)


def summary_dict(report: RunReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "started": report.started.isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 3),
        "images": [i.as_dict() for i in report.images],
        "errors": report.errors,
        "totals": dict(Counter(i.status for i in report.images)),
    }


def summary_json(report: RunReport) -> str:
    return json.dumps(summary_dict(report), indent=1)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kv.items()) + "}"


METRICS = (
    ("rbd2qcow2_image_last_success_timestamp_seconds", "gauge", "Time of the newest point of the image."),
    ("rbd2qcow2_image_duration_seconds", "gauge", "Time spent on the image in the last run."),
    ("rbd2qcow2_image_read_bytes", "gauge", "Bytes read from RBD for the image in the last run."),
    ("rbd2qcow2_image_written_bytes", "gauge", "Bytes written (data and zeros) for the image in the last run."),
    ("rbd2qcow2_image_status", "gauge", "1 for the status of the image in the last run."),
    ("rbd2qcow2_run_images", "gauge", "Images by status in the last run."),
    ("rbd2qcow2_run_duration_seconds", "gauge", "Duration of the last run."),
    ("rbd2qcow2_run_timestamp_seconds", "gauge", "Start of the last run."),
    ("rbd2qcow2_run_success", "gauge", "1 if the last run succeeded."),
)


def prometheus_text(report: RunReport) -> str:
    samples: dict[str, list[str]] = {name: [] for name, _, _ in METRICS}
    for i in report.images:
        lbl = dict(cluster=i.cluster, pool=i.image.pool, namespace=i.image.namespace, image=i.image.name)
        if i.last_success:
            ts = datetime.fromisoformat(i.last_success).timestamp()
            samples["rbd2qcow2_image_last_success_timestamp_seconds"].append(f"{_labels(**lbl)} {ts:.0f}")
        samples["rbd2qcow2_image_duration_seconds"].append(f"{_labels(**lbl)} {i.seconds:.3f}")
        samples["rbd2qcow2_image_read_bytes"].append(f"{_labels(**lbl)} {i.bytes_read}")
        samples["rbd2qcow2_image_written_bytes"].append(f"{_labels(**lbl)} {i.bytes_written}")
        samples["rbd2qcow2_image_status"].append(f"{_labels(**lbl, status=i.status)} 1")
    for status, n in sorted(Counter(i.status for i in report.images).items()):
        samples["rbd2qcow2_run_images"].append(f"{_labels(status=status)} {n}")
    samples["rbd2qcow2_run_images"].append(f"{_labels(status='errors')} {len(report.errors)}")
    samples["rbd2qcow2_run_duration_seconds"].append(f" {report.seconds:.3f}")
    samples["rbd2qcow2_run_timestamp_seconds"].append(f" {report.started.timestamp():.0f}")
    samples["rbd2qcow2_run_success"].append(f" {1 if report.ok else 0}")
    out = []
    for name, kind, help_text in METRICS:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        out += [f"{name}{sample}" for sample in samples[name]]
    return "\n".join(out) + "\n"


def write_metrics(path: Path, report: RunReport) -> None:
    """Written atomically, so node_exporter never reads half a file."""
    atomic_write(path, prometheus_text(report).encode())
    path.chmod(0o644)  # node_exporter usually runs as another user


def exit_code(report: RunReport) -> int:
    codes = [i.exit_code for i in report.images if i.status == FAILED]
    if report.errors:  # a cluster or pool that could not be reached or listed
        codes.append(CephUnavailable.exit_code)
    return combined_exit_code(codes)
