"""Settings of the explanation worker: command line > environment > default, fail fast on bad values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr.core.errors import InvalidInputError
from cxr.core.jobs import check_job_id, parse_timestamp
from services.worker.settings import SettingsError, WorkerSettings, load_settings

pytestmark = pytest.mark.unit


def _env(model_dir: Path, **extra: str) -> dict[str, str]:
    return {"CXR_MODEL_DIR": str(model_dir), **extra}


def test_defaults_follow_the_architecture_document(tmp_path: Path) -> None:
    s = load_settings([], _env(tmp_path))
    assert s.model_dir == tmp_path
    assert s.redis_url == "redis://127.0.0.1:6390/0"
    assert (s.concurrency, s.metrics_port, s.heatmap_grid, s.result_ttl_s) == (1, 9152, 64, 86400)
    assert (s.soft_time_limit_s, s.time_limit_s, s.max_retries, s.visibility_timeout_s) == (120, 180, 3, 600)
    assert s.task_test_delay_s == 0 and s.ready_file is None
    assert s.overlay_max_side == 1024


def test_environment_overrides_defaults_and_command_line_overrides_environment(tmp_path: Path) -> None:
    env = _env(tmp_path, CXR_WORKER_CONCURRENCY="2", CXR_HEATMAP_GRID="32", CXR_WORKER_METRICS_PORT="0")
    env["CXR_OVERLAY_MAX_SIDE"] = "512"
    s = load_settings(["--concurrency", "3", "--loglevel", "DEBUG"], env)
    assert (s.concurrency, s.heatmap_grid, s.metrics_port, s.loglevel) == (3, 32, 0, "debug")
    assert s.overlay_max_side == 512
    assert load_settings(["--overlay-max-side", "256"], env).overlay_max_side == 256


def test_command_line_model_dir_wins_over_environment(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    assert load_settings(["--model-dir", str(other)], _env(tmp_path)).model_dir == other


def test_empty_environment_value_means_unset(tmp_path: Path) -> None:
    assert load_settings([], _env(tmp_path, CXR_REDIS_URL="")).redis_url == "redis://127.0.0.1:6390/0"


def test_model_dir_is_required() -> None:
    with pytest.raises(SettingsError, match="CXR_MODEL_DIR"):
        load_settings([], {})


def test_model_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not a directory"):
        load_settings([], _env(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CXR_WORKER_CONCURRENCY", "two", "CXR_WORKER_CONCURRENCY"),
        ("CXR_WORKER_CONCURRENCY", "0", "must be > 0"),
        ("CXR_TASK_MAX_RETRIES", "-1", "must be >= 0"),
        ("CXR_WORKER_METRICS_PORT", "70000", "not a port"),
        ("CXR_WORKER_LOGLEVEL", "loud", "CXR_WORKER_LOGLEVEL"),
        ("CXR_HEATMAP_GRID", "1024", "at most 512"),
        ("CXR_OVERLAY_MAX_SIDE", "32", "at least 64"),
        ("CXR_OVERLAY_MAX_SIDE", "big", "CXR_OVERLAY_MAX_SIDE"),
        ("CXR_REDIS_URL", "http://127.0.0.1:6390", "redis://"),
        ("CXR_TASK_SOFT_TIME_LIMIT_S", "200", "below CXR_TASK_TIME_LIMIT_S"),
        ("CXR_VISIBILITY_TIMEOUT_S", "150", "must exceed the hard time limit"),
        ("CXR_TASK_MAX_ATTEMPTS", "3", "CXR_TASK_MAX_ATTEMPTS"),
    ],
)
def test_bad_values_fail_fast_naming_the_variable(tmp_path: Path, variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings([], _env(tmp_path, **{variable: value}))


def test_unknown_flag_exits_with_usage(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(["--no-such-flag"], _env(tmp_path))
    assert exc.value.code == 2


def test_visibility_timeout_counts_the_longest_retry_countdown(tmp_path: Path) -> None:
    # hard limit 180 + backoff 2 * 2**(3 - 1) = 188: 188 is too short, 189 is enough
    with pytest.raises(SettingsError):
        load_settings([], _env(tmp_path, CXR_VISIBILITY_TIMEOUT_S="188"))
    assert load_settings([], _env(tmp_path, CXR_VISIBILITY_TIMEOUT_S="189")).visibility_timeout_s == 189


def test_torch_threads_auto_splits_the_cpus_between_children(tmp_path: Path) -> None:
    assert WorkerSettings(model_dir=tmp_path, torch_threads=3).threads_per_child() == 3
    auto = WorkerSettings(model_dir=tmp_path, concurrency=64).threads_per_child()
    assert auto >= 1
    cpus = os.cpu_count() or 1  # one CPU of the child's share is left to the display decode thread
    assert WorkerSettings(model_dir=tmp_path, concurrency=1).threads_per_child() == max(1, cpus - 1)


def test_hostname_is_unique_per_process_unless_given(tmp_path: Path) -> None:
    assert WorkerSettings(model_dir=tmp_path).worker_hostname.startswith("explain-")
    assert WorkerSettings(model_dir=tmp_path, hostname="w1@h").worker_hostname == "w1@h"


@pytest.mark.parametrize("job_id", ["", "ABCDEF" * 6, "../../etc/passwd", 42, "0" * 31])
def test_malformed_job_ids_are_rejected(job_id: object) -> None:
    with pytest.raises(InvalidInputError, match="BAD_JOB_ID"):
        check_job_id(job_id)


def test_timestamps_parse_as_epoch_seconds_or_iso_8601() -> None:
    assert parse_timestamp("1700000000.5") == 1700000000.5
    assert parse_timestamp("2023-11-14T22:13:20+00:00") == 1700000000.0
    assert parse_timestamp("yesterday") is None and parse_timestamp(None) is None


def test_test_only_delay_is_read_from_the_environment_only(tmp_path: Path) -> None:
    assert load_settings([], _env(tmp_path, CXR_TASK_TEST_DELAY_S="1.5")).task_test_delay_s == 1.5
    with pytest.raises(SystemExit):
        load_settings(["--task-test-delay-s", "1.5"], _env(tmp_path))
