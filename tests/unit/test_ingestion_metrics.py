"""The ingestion service's drift and queue metrics: positive decisions per finding, analysed images, the vote
fraction histogram, series created at start for every finding of the manifest, and the queue length probe when
Redis does not answer; the exposition passes `promtool check metrics`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cxr.ingestion.v1 import ingestion_pb2 as pb
from services.ingestion.metrics import IngestionMetrics

pytestmark = pytest.mark.unit
LABELS = ("Atelectasis", "Effusion", "Nodule")


def _sample(metrics: IngestionMetrics, sample: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(sample, labels)
    return None if value is None else float(value)


def _finding(label: str, votes: int, n_models: int = 3, positive: bool | None = None) -> pb.Finding:
    return pb.Finding(label=label, votes=votes, n_models=n_models, positive=votes * 2 > n_models
                      if positive is None else positive)  # fmt: skip


@pytest.fixture
def metrics() -> IngestionMetrics:
    m = IngestionMetrics(CollectorRegistry())
    m.set_model("demo", "1.0.0", LABELS)
    return m


def test_every_finding_has_its_series_at_zero_from_the_start(metrics: IngestionMetrics) -> None:
    for label in LABELS:
        assert _sample(metrics, "cxr_ingestion_positive_findings_total", label=label) == 0.0
        assert _sample(metrics, "cxr_ingestion_vote_fraction_count", label=label) == 0.0
    assert _sample(metrics, "cxr_ingestion_analysed_images_total") == 0.0
    assert _sample(metrics, "cxr_ingestion_model_info", name="demo", version="1.0.0") == 1.0


def test_positive_decisions_and_images_are_counted(metrics: IngestionMetrics) -> None:
    metrics.observe_findings([_finding("Atelectasis", 3), _finding("Effusion", 1), _finding("Nodule", 2)])
    metrics.observe_findings([_finding("Atelectasis", 2), _finding("Effusion", 0), _finding("Nodule", 0)])
    # the decision is the ensemble's (probability vs threshold), not a majority of votes: it is taken as given
    metrics.observe_findings([_finding("Atelectasis", 0), _finding("Effusion", 1, positive=True),
                              _finding("Nodule", 0)])  # fmt: skip
    assert _sample(metrics, "cxr_ingestion_analysed_images_total") == 3.0
    assert _sample(metrics, "cxr_ingestion_positive_findings_total", label="Atelectasis") == 2.0
    assert _sample(metrics, "cxr_ingestion_positive_findings_total", label="Effusion") == 1.0
    assert _sample(metrics, "cxr_ingestion_positive_findings_total", label="Nodule") == 1.0


def test_vote_fractions_fall_in_buckets_that_separate_thirds_quarters_and_fifths(metrics: IngestionMetrics) -> None:
    for votes in (0, 1, 2, 3):
        metrics.observe_findings([_finding("Nodule", votes)])
    bucket = "cxr_ingestion_vote_fraction_bucket"
    cumulative = {le: _sample(metrics, bucket, label="Nodule", le=le) for le in ("0.0", "0.3", "0.4", "0.6", "0.7",
                                                                                 "0.9", "1.0", "+Inf")}  # fmt: skip
    assert cumulative == {"0.0": 1, "0.3": 1, "0.4": 2, "0.6": 2, "0.7": 3, "0.9": 3, "1.0": 4, "+Inf": 4}
    assert _sample(metrics, "cxr_ingestion_vote_fraction_sum", label="Nodule") == pytest.approx(2.0)
    for votes in range(6):  # five models: 0.2, 0.4, ... land exactly on the bucket bounds, inclusive
        metrics.observe_findings([_finding("Effusion", votes, n_models=5)])
    assert _sample(metrics, bucket, label="Effusion", le="0.2") == 2
    assert _sample(metrics, bucket, label="Effusion", le="0.6") == 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_queue_length_is_left_out_quickly_when_redis_does_not_answer(metrics: IngestionMetrics) -> None:
    metrics.watch_queue(f"redis://127.0.0.1:{_closed_port()}/0", "explain")
    t0 = time.monotonic()
    text = generate_latest(metrics.registry).decode()
    assert time.monotonic() - t0 < 3.0
    assert "# TYPE cxr_ingestion_explain_queue_length gauge" in text
    assert "cxr_ingestion_explain_queue_length{" not in text  # unknown is not zero
    metrics.close()
    assert "cxr_ingestion_explain_queue_length" not in generate_latest(metrics.registry).decode()


def test_the_exposition_passes_promtool_check_metrics(metrics: IngestionMetrics) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install the Debian package `prometheus`"
    metrics.observe_findings([_finding(label, 2) for label in LABELS])
    done = subprocess.run([promtool, "check", "metrics"], input=generate_latest(metrics.registry), capture_output=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
