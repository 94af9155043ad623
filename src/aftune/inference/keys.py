"""Which key signs a provider's receipts: the one it names, else its run's, else one kept in the
record directory (created once: hand out only the .pub).

    key, public_key_path = provider_key(None, Path("runs/demo"), Path("records"))
"""

from __future__ import annotations

from pathlib import Path

from ..core.signing import SigningKey
from .served import is_run_dir


def provider_key(key: Path | None, model_path: Path, record_dir: Path) -> tuple[SigningKey, Path]:
    """The signing key: --key, else the run's own provider key, else RECORD_DIR/provider.key
    (created once; hand out only the .pub)."""
    if key is not None:
        return SigningKey.load(key), Path(str(key) + ".pub")
    run = model_path if is_run_dir(model_path) else (
        model_path.parent if model_path.name == "model" and is_run_dir(model_path.parent) else None)
    if run is not None and (run / "provider.key").is_file():
        return SigningKey.load(run / "provider.key"), run / "provider.key.pub"
    path = record_dir / "provider.key"
    if path.is_file():
        return SigningKey.load(path), record_dir / "provider.key.pub"
    record_dir.mkdir(parents=True, exist_ok=True)
    k = SigningKey.generate()
    return k, k.save(path)
