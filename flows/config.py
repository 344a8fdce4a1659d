"""Project and model-line configuration (one YAML file, ``editops.yaml``).

A *model line* is a sequence of versions of one base model edited by one editor.
Its config says which base model, which editor (and its hyperparameters), the
batch size, which requesters may file tickets against it, the gate thresholds and
the promotion policy::

    workdir: .editops                      # inbox/outbox/quarantine/ledger/mlflow live here
    ledger_url: null                       # default sqlite:///<workdir>/ledger.db; any SQLAlchemy URL
    tracking_uri: null                     # default sqlite:///<workdir>/mlflow.db
    lines:
      smollm2-135m-facts:
        base_model: models/smollm2-135m
        kind: fact                         # fact | deletion
        editor: nse
        hyperparameters: {}
        hold_relations: null               # hold the subject's other relations (every ticket's prompt) from batch 1
        batch_size: 8
        allowed_requesters: ["*"]          # "*" = anyone
        promotion: auto                    # auto (gates pass -> champion) | manual
        gates: {efficacy: 0.8, paraphrase: 0.5, neighbourhood: 0.8, perplexity_drift: 0.1, retention: 0.9}

Relative paths are relative to the config file's directory (the project dir).
``EDITOPS_CONFIG`` names the file; without one, ``./editops.yaml``; without that,
the built-in lines of :mod:`editing.catalog` (when it lists them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, asdict
from pathlib import Path
from typing import Any

from editing.errors import EditopsError
from editing.gates import GateThresholds


class ConfigError(EditopsError):
    """The editops.yaml file is missing fields, has unknown ones, or names an unknown line."""


KINDS = ("fact", "deletion")
PROMOTION_POLICIES = ("auto", "manual")


@dataclass
class LineConfig:
    """One model line: what is edited, by which editor, by whom, under which gates."""

    name: str
    base_model: str
    kind: str = "fact"
    editor: str = "nse"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    allowed_requesters: list[str] = field(default_factory=lambda: ["*"])
    promotion: str = "auto"
    gates: GateThresholds | None = None   # None: the line kind's defaults (GateThresholds.from_dict({}, kind))
    heldout: str | None = None  # held-out text for perplexity: a file (one text per line), stdlib:N or samples:N
    max_new_tokens: int = 40    # deletion lines: generation length for the gates
    # fact lines whose editor holds a subject's other facts (other_prompts): hold every prompt of the line's applied
    # and queued tickets from the first batch on (None: where it applies; true: an error where nothing holds them)
    hold_relations: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"line {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.gates is None:
            self.gates = GateThresholds.from_dict({}, kind=self.kind)
        if self.promotion not in PROMOTION_POLICIES:
            raise ConfigError(f"line {self.name!r}: promotion must be one of {PROMOTION_POLICIES}, not {self.promotion!r}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"line {self.name!r}: batch_size must be ≥ 1")
        self.batch_size = int(self.batch_size)
        if self.hold_relations is not None and not isinstance(self.hold_relations, bool):
            raise ConfigError(f"line {self.name!r}: hold_relations must be true, false or left out, "
                              f"not {self.hold_relations!r}")

    def allows(self, requester: str) -> bool:
        return "*" in self.allowed_requesters or requester in self.allowed_requesters

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProjectConfig:
    """Where editops keeps its state, and the model lines it serves."""

    root: Path
    workdir: Path
    lines: dict[str, LineConfig]
    ledger_url: str
    tracking_uri: str
    registry_uri: str | None = None
    artifact_root: Path | None = None

    @property
    def inbox(self) -> Path:
        return self.workdir / "inbox"

    @property
    def outbox(self) -> Path:
        return self.workdir / "outbox"

    @property
    def quarantine(self) -> Path:
        return self.workdir / "quarantine"

    def line(self, name: str) -> LineConfig:
        if name not in self.lines:
            raise ConfigError(f"unknown model line {name!r}; configured lines: {sorted(self.lines)}")
        return self.lines[name]

    def ensure_dirs(self) -> None:
        for p in (self.workdir, self.inbox, self.outbox, self.quarantine):
            p.mkdir(parents=True, exist_ok=True)


def _resolve(root: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    if p.is_absolute() or "://" in value:
        return value
    cand = root / p
    # a relative path that exists (or looks like one) is project-relative; a bare hub id stays as is
    return str(cand) if (cand.exists() or value.startswith((".", "models/", "data/"))) else value


def _catalog_lines() -> dict[str, dict[str, Any]]:
    """Model lines of the project's models (:mod:`editing.catalog`), used when no config file exists."""
    try:
        from editing import catalog
    except ImportError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for entry in catalog.CATALOG.values():
        deletion = entry.kind == "seq2seq" or "deletion" in entry.line
        out[entry.line] = {"base_model": str(entry.model_path()), "kind": "deletion" if deletion else "fact",
                           "editor": "rank-one" if deletion else "nse"}
        if entry.stats_corpus:  # the registry materialises models elsewhere: name the domain text explicitly
            out[entry.line]["hyperparameters"] = {"stats_corpus": str(catalog.resolve(entry.stats_corpus))}
    return out


def load_config(path: str | os.PathLike | None = None, *, workdir: str | os.PathLike | None = None) -> ProjectConfig:
    """Read ``editops.yaml`` (see module docstring); defaults for everything not given."""
    import yaml

    if path is None:
        path = os.environ.get("EDITOPS_CONFIG") or ("editops.yaml" if Path("editops.yaml").is_file() else None)
    raw: dict[str, Any] = {}
    root = Path.cwd()
    if path is not None:
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; create it (see `editops --help`) or unset EDITOPS_CONFIG")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} must hold a mapping with a 'lines' key")
        root = p.parent
    known = {"workdir", "ledger_url", "tracking_uri", "registry_uri", "artifact_root", "lines"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in the config; known: {sorted(known)}")
    wd = Path(workdir or raw.get("workdir") or ".editops")
    wd = (wd if wd.is_absolute() else root / wd).resolve()
    lines_raw = raw.get("lines") if raw.get("lines") is not None else _catalog_lines()
    lines: dict[str, LineConfig] = {}
    for name, spec in (lines_raw or {}).items():
        spec = dict(spec or {})
        allowed = {f.name for f in fields(LineConfig)} - {"name"}
        bad = sorted(set(spec) - allowed)
        if bad:
            raise ConfigError(f"line {name!r}: unknown key(s) {bad}; known: {sorted(allowed)}")
        if "base_model" not in spec:
            raise ConfigError(f"line {name!r}: 'base_model' is required (a model directory or hub id)")
        spec["base_model"] = _resolve(root, str(spec["base_model"]))
        try:
            spec["gates"] = GateThresholds.from_dict(spec.get("gates"), kind=str(spec.get("kind", "fact")))
        except EditopsError as exc:
            raise ConfigError(f"line {name!r}: {exc}") from exc
        allowed_req = spec.get("allowed_requesters", ["*"])
        spec["allowed_requesters"] = [allowed_req] if isinstance(allowed_req, str) else list(allowed_req)
        lines[str(name)] = LineConfig(name=str(name), **spec)
    ledger_url = raw.get("ledger_url") or os.environ.get("EDITOPS_LEDGER_URL") or f"sqlite:///{wd}/ledger.db"
    tracking_uri = raw.get("tracking_uri") or os.environ.get("EDITOPS_TRACKING_URI") or f"sqlite:///{wd}/mlflow.db"
    art = raw.get("artifact_root")
    artifact_root = Path(art) if art else wd / "artifacts"
    if not artifact_root.is_absolute():
        artifact_root = (root / artifact_root).resolve()
    return ProjectConfig(root=root, workdir=wd, lines=lines, ledger_url=ledger_url, tracking_uri=tracking_uri,
                         registry_uri=raw.get("registry_uri"), artifact_root=artifact_root)


def write_config(cfg: ProjectConfig, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML (absolute paths), e.g. for tests and the demo."""
    import yaml

    data = {
        "workdir": str(cfg.workdir),
        "ledger_url": cfg.ledger_url,
        "tracking_uri": cfg.tracking_uri,
        "artifact_root": str(cfg.artifact_root) if cfg.artifact_root else None,
        "lines": {n: {k: v for k, v in l.to_dict().items() if k != "name"} for n, l in cfg.lines.items()},
    }
    if cfg.registry_uri:
        data["registry_uri"] = cfg.registry_uri
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p
