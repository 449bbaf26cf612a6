"""Settings of the ingestion service (CLI > env > default, fail fast) and its import surface (never torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cxr.core.manifest import Manifest, ModelEntry, write_manifest
from services.ingestion.settings import MIB, IngestionSettings, SettingsError, load_settings, split_host_port

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    manifest = Manifest(
        name="cxr-settings-test",
        version="1",
        labels=("Effusion", "No_Finding"),
        thresholds=(0.5, 0.5),
        models=(ModelEntry(name="resnet18", arch="resnet18", weights="resnet18.pt"),),
    )
    write_manifest(tmp_path, manifest)
    return tmp_path


def test_defaults_follow_the_architecture(model_dir: Path) -> None:
    s = load_settings([], {"CXR_MODEL_DIR": str(model_dir)})
    assert s.addr == "127.0.0.1:50151"
    assert s.metrics_port == 9151
    assert s.redis_url == "redis://127.0.0.1:6390/0"
    assert s.torchserve_grpc == "127.0.0.1:7470"
    assert s.torchserve_model == "cxr"
    assert s.torchserve_token_file is None
    assert s.max_upload_bytes == 64 * MIB
    assert (s.max_concurrent, s.lateral_policy, s.result_ttl_s) == (8, "reject", 86400)
    assert (s.inference_timeout_s, s.inference_retries, s.grace_s) == (30.0, 2, 10.0)
    assert s.model_dir == model_dir
    assert s.host == "127.0.0.1"


def test_environment_overrides_defaults_and_cli_overrides_environment(model_dir: Path) -> None:
    env = {
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_MAX_CONCURRENT": "3",
        "CXR_LATERAL_POLICY": "warn",
        "CXR_TORCHSERVE_TOKEN_FILE": "/srv/ts/key_file.json",
        "CXR_INFERENCE_TIMEOUT_S": "2.5",
    }
    s = load_settings(["--max-concurrent", "5", "--addr", "0.0.0.0:0"], env)
    assert s.max_concurrent == 5  # CLI wins
    assert s.lateral_policy == "warn"  # env wins over default
    assert s.torchserve_token_file == Path("/srv/ts/key_file.json")
    assert s.inference_timeout_s == 2.5
    assert (s.addr, s.host) == ("0.0.0.0:0", "0.0.0.0")


@pytest.mark.parametrize(
    ("env_name", "value"),
    [
        ("CXR_INGESTION_ADDR", "127.0.0.1"),
        ("CXR_INGESTION_ADDR", "127.0.0.1:70000"),
        ("CXR_INGESTION_METRICS_PORT", "-1"),
        ("CXR_INGESTION_METRICS_PORT", "nine"),
        ("CXR_REDIS_URL", "http://127.0.0.1:6390"),
        ("CXR_TORCHSERVE_GRPC", ":7470"),
        ("CXR_TORCHSERVE_MODEL", "  "),
        ("CXR_MAX_UPLOAD_BYTES", "0"),
        ("CXR_MAX_CONCURRENT", "-2"),
        ("CXR_LATERAL_POLICY", "allow"),
        ("CXR_RESULT_TTL_S", "1.5"),
        ("CXR_DICOM_TTL_S", "0"),
        ("CXR_INFERENCE_TIMEOUT_S", "0"),
        ("CXR_INFERENCE_TIMEOUT_S", "inf"),
        ("CXR_INFERENCE_RETRIES", "-1"),
        ("CXR_GRACE_S", "soon"),
    ],
)
def test_invalid_values_fail_fast_naming_the_variable(model_dir: Path, env_name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=env_name):
        load_settings([], {"CXR_MODEL_DIR": str(model_dir), env_name: value})


def test_a_model_dir_without_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="CXR_MODEL_DIR.*no manifest.json"):
        load_settings([], {"CXR_MODEL_DIR": str(tmp_path)})


def test_the_default_model_dir_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no model_store/cxr-nih14-imagenet here
    with pytest.raises(SettingsError, match="CXR_MODEL_DIR"):
        load_settings([], {})


def test_every_problem_is_reported_at_once(model_dir: Path) -> None:
    env = {"CXR_MODEL_DIR": str(model_dir), "CXR_MAX_CONCURRENT": "0", "CXR_LATERAL_POLICY": "x"}
    with pytest.raises(SettingsError) as info:
        load_settings(["--grace-s", "-3"], env)
    message = str(info.value)
    assert "CXR_MAX_CONCURRENT" in message and "CXR_LATERAL_POLICY" in message and "CXR_GRACE_S" in message


def test_split_host_port_rejects_what_is_not_an_address() -> None:
    assert split_host_port("[::1]:50151") == ("[::1]", 50151)
    for bad in ("50151", "host:", "host:port", "host:65536"):
        with pytest.raises(ValueError):
            split_host_port(bad)


def test_settings_are_immutable(model_dir: Path) -> None:
    s = load_settings([], {"CXR_MODEL_DIR": str(model_dir)})
    with pytest.raises(AttributeError):
        s.max_concurrent = 99  # type: ignore[misc]
    assert isinstance(s, IngestionSettings)


def test_main_exits_2_on_invalid_settings_before_binding(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CXR_MODEL_DIR": str(tmp_path), "CXR_MAX_CONCURRENT": "zero"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.ingestion"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "CXR_MAX_CONCURRENT" in proc.stderr and "CXR_MODEL_DIR" in proc.stderr


def test_importing_the_service_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import services.ingestion.server, services.ingestion.__main__\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision', 'captum')))\n"
        "assert not leaked, leaked\n"
        "print('clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_a_bad_redis_url_is_reported_without_its_password(model_dir: Path) -> None:
    env = {"CXR_MODEL_DIR": str(model_dir), "CXR_REDIS_URL": "http://user:s3cret@cache.local:6379/0"}
    with pytest.raises(SettingsError, match="CXR_REDIS_URL") as info:
        load_settings([], env)
    assert "s3cret" not in str(info.value)
    assert "cache.local:6379/0" in str(info.value)
