"""Reading and writing TorchServe archives (.mar): the manifest, safe extraction, and a guarded archive
staged from the original's files plus layerguard's runtime (core + serving only), written by
torch-model-archiver itself so the format is exactly TorchServe's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import yaml

from ..core.artifact import DEFAULT_FILENAME, CalibrationArtifact

__all__ = [
    "CONFIG_FILE", "GUARD_HANDLER_FILE", "RUNTIME_PACKAGES", "ArchiveError", "ENTRY_SOURCE", "extract_mar",
    "read_manifest", "read_yaml", "write_guarded_archive",
]

GUARD_HANDLER_FILE = "layerguard_handler.py"
CONFIG_FILE = "model-config.yaml"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
RUNTIME_PACKAGES = ("core", "serving")  # all a worker imports: no tooling, report, CLI or demo
ENTRY_SOURCE = '"""TorchServe entry point of this guarded archive (written by `layerguard wrap`)."""\n\n' \
               "from layerguard.serving.entry import handle  # noqa: F401\n"


class ArchiveError(ValueError):
    """The archive cannot be read or written; the message says what to change."""


def read_manifest(mar: str | Path) -> dict:
    """MAR-INF/MANIFEST.json of a .mar (zip) without extracting it."""
    try:
        with zipfile.ZipFile(mar) as zf:
            return json.loads(zf.read("MAR-INF/MANIFEST.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ArchiveError(f"{mar} is not a readable .mar (zip with MAR-INF/MANIFEST.json): {exc}") from exc


def extract_mar(mar: str | Path, dest: Path) -> dict:
    """Extract safely (no absolute or parent paths) and return the manifest."""
    manifest = read_manifest(mar)
    with zipfile.ZipFile(mar) as zf:
        for member in zf.namelist():
            target = (dest / member).resolve()
            if not str(target).startswith(str(dest.resolve())):
                raise ArchiveError(f"{mar} holds an unsafe path {member!r}")
        zf.extractall(dest)
    return manifest


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ArchiveError(f"{path.name} in the archive is not a YAML mapping")
    return data


def _copy_runtime(dest: Path) -> None:
    """layerguard's runtime as plain source (no caches), importable from the worker's model dir."""
    root = dest / "layerguard"
    root.mkdir()
    shutil.copy(PACKAGE_DIR / "__init__.py", root / "__init__.py")
    for package in RUNTIME_PACKAGES:
        shutil.copytree(PACKAGE_DIR / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def write_guarded_archive(scratch: Path, original: Path, manifest: dict, name: str, artifact: CalibrationArtifact,
                          config: dict, out_dir: Path, signing_key: bytes | None = None) -> Path:
    """Stage the original files, the runtime, the artifact and the new model-config.yaml, and let
    torch-model-archiver write `out_dir/<name>.mar`."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    model = manifest["model"]
    staged = scratch / "staged"
    shutil.copytree(original, staged, ignore=shutil.ignore_patterns("MAR-INF", "__pycache__"))
    if model.get("configFile"):
        (staged / model["configFile"]).unlink(missing_ok=True)
    for clash in ("layerguard", GUARD_HANDLER_FILE, DEFAULT_FILENAME, CONFIG_FILE):
        if (staged / clash).exists():
            raise ArchiveError(f"the original archive already holds {clash}; rename it there first")
    _copy_runtime(staged)
    artifact.save(staged / DEFAULT_FILENAME, signing_key=signing_key)
    extras = scratch / "files"
    (extras / "config").mkdir(parents=True)
    handler_file = extras / GUARD_HANDLER_FILE
    handler_file.write_text(ENTRY_SOURCE)
    config_file = extras / "config" / CONFIG_FILE
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    serialized, model_file = model.get("serializedFile"), model.get("modelFile")
    requirements = model.get("requirementsFile")
    archiver = ModelArchiverConfig(
        model_name=name,
        handler=str(handler_file),
        version=str(model.get("modelVersion") or "1.0"),
        serialized_file=str(staged / serialized) if serialized else None,
        model_file=str(staged / model_file) if model_file else None,
        extra_files=str(staged),
        export_path=str(out_dir),
        force=True,
        requirements_file=str(staged / requirements) if requirements else None,
        config_file=str(config_file),
        runtime=manifest.get("runtime", "python"),
    )
    # The archiver stages in tempfile.gettempdir()/<name>: point it at our scratch so that concurrent
    # wraps of equally named models never share a directory.
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        generate_model_archive(archiver)
    finally:
        tempfile.tempdir = saved
    return out_dir / f"{name}.mar"
