"""The ensemble manifest: everything that must travel with the weights so that any consumer (TorchServe
handler, explanation worker, evaluation) interprets them identically.

On disk an ensemble is a directory::

    manifest.json          # this dataclass, JSON
    <model name>.pt        # one torch state_dict per model (stored in float16 to keep bundles small)
    report.md / report.json / *.png / README.md   # evaluation evidence and model card (optional)

The manifest is plain JSON so that non-Python tools (and the ingestion service, which has no torch) can read it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxr.core.errors import ManifestError
from cxr.core.preprocess import PreprocessSpec

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2
ENSEMBLE_RULES = ("ctp", "ptc_lw", "ptc_mode")


@dataclass(frozen=True)
class ModelEntry:
    """One CNN of the ensemble."""

    name: str  # unique within the ensemble, e.g. "densenet121"
    arch: str  # a key of cxr.models.architectures.ARCHITECTURES
    weights: str  # file name inside the ensemble directory
    sha256: str = ""  # of the weights file; checked on load when present
    hidden: int = 512  # width of the two dense layers of the head (paper: 512); 0 = linear head
    dropout: float = 0.2
    thresholds: tuple[float, ...] | None = None  # per-label; None -> the ensemble thresholds are used for votes
    input_norm: str = "spec"  # input mapping inside the model (cxr.models.architectures.INPUT_NORMS)
    # calibration (cxr.core.calibration): probability = sigmoid((logit - logit_offset) / temperature), per label;
    # None = identity (bundles written before calibration existed)
    logit_offset: tuple[float, ...] | None = None
    temperature: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    labels: tuple[str, ...]
    thresholds: tuple[float, ...]  # per label, applied to the ensemble (CTP) probability
    models: tuple[ModelEntry, ...]
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    ensemble_rule: str = "ctp"
    threshold_criterion: str = "fixed 0.5"  # how thresholds were chosen (documented in the evaluation report)
    calibration: str = "none"  # how each model's logit_offset / temperature were fitted
    description: str = ""
    trained_on: str = ""
    intended_use: str = "Research and demonstration only. NOT FOR CLINICAL USE."
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ManifestError if the manifest is internally inconsistent."""
        if not self.name or not self.version:
            raise ManifestError("manifest needs a name and a version")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ManifestError("labels must be a non-empty list of unique names")
        if len(self.thresholds) != len(self.labels):
            raise ManifestError(f"{len(self.thresholds)} thresholds for {len(self.labels)} labels")
        for t in self.thresholds:
            if not (0.0 <= t <= 1.0) or math.isnan(t):
                raise ManifestError(f"threshold {t} outside [0, 1]")
        if not self.models:
            raise ManifestError("an ensemble needs at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ManifestError(f"model names must be unique: {names}")
        for m in self.models:
            for what in ("thresholds", "logit_offset", "temperature"):
                v = getattr(m, what)
                if v is not None and len(v) != len(self.labels):
                    raise ManifestError(f"model {m.name}: {len(v)} values of {what} for {len(self.labels)} labels")
            if m.temperature is not None and not all(t > 0 and math.isfinite(t) for t in m.temperature):
                raise ManifestError(f"model {m.name}: temperatures must be positive and finite")
        if self.ensemble_rule not in ENSEMBLE_RULES:
            raise ManifestError(f"unknown ensemble rule {self.ensemble_rule!r}; known: {ENSEMBLE_RULES}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def model_thresholds(self, name: str) -> tuple[float, ...]:
        """Thresholds used for one model's vote: its own if tuned, else the ensemble's."""
        for m in self.models:
            if m.name == name:
                return m.thresholds if m.thresholds is not None else self.thresholds
        raise ManifestError(f"no model named {name!r}")

    # -- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["thresholds"] = [float(t) for t in self.thresholds]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            models = tuple(
                ModelEntry(**{**m, **{k: _optional_tuple(m.get(k)) for k in _PER_LABEL}}) for m in d["models"]
            )
            return cls(
                name=d["name"],
                version=str(d["version"]),
                labels=tuple(d["labels"]),
                thresholds=tuple(float(t) for t in d["thresholds"]),
                models=models,
                preprocess=PreprocessSpec(**d.get("preprocess", {})),
                ensemble_rule=d.get("ensemble_rule", "ctp"),
                threshold_criterion=d.get("threshold_criterion", "fixed 0.5"),
                calibration=d.get("calibration", "none"),
                description=d.get("description", ""),
                trained_on=d.get("trained_on", ""),
                intended_use=d.get("intended_use", cls.intended_use),
                schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest is not JSON: {e}") from e


_PER_LABEL = ("thresholds", "logit_offset", "temperature")


def _optional_tuple(values: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values else None


def read_manifest(ensemble_dir: str | Path) -> Manifest:
    """Read ``manifest.json`` from an ensemble directory. Raises ManifestError."""
    path = Path(ensemble_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {ensemble_dir}")
    return Manifest.from_json(path.read_text())


def write_manifest(ensemble_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(ensemble_dir) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest.to_json())
    return path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks. Raises OSError if it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_weights_path(ensemble_dir: str | Path, entry: ModelEntry) -> Path:
    """The path of ``entry``'s weights file in ``ensemble_dir``, after checking that it exists and, when the
    manifest has one, matches its sha256 (no torch needed). Raises ManifestError otherwise."""
    root = Path(ensemble_dir)
    path = root / entry.weights
    if not path.is_file():
        raise ManifestError(f"weights {entry.weights} of model {entry.name} missing in {root}")
    if entry.sha256 and file_sha256(path) != entry.sha256:
        raise ManifestError(f"weights {entry.weights} do not match the manifest's sha256")
    return path
