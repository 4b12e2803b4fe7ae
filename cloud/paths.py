"""Where the operator's registry, signing key and fleet CA live (``$AUTOGLM_HOME``, default ``~/.autoglm``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CloudPaths:
    home: Path

    @classmethod
    def from_env(cls) -> CloudPaths:
        return cls(Path(os.environ.get("AUTOGLM_HOME", Path.home() / ".autoglm")).expanduser())

    @property
    def registry(self) -> Path:
        return self.home / "registry"

    @property
    def signing_key(self) -> Path:
        return self.home / "keys" / "manifest-signing.pem"

    @property
    def control_key(self) -> Path:
        """Signs desired states and commands (distinct from the manifest key)."""
        return self.home / "keys" / "control-signing.pem"

    @property
    def demo_source(self) -> Path:
        """The toy GLM that ``autoglm model demo`` trains."""
        return self.home / "demo-model"

    @property
    def models(self) -> Path:
        """Hugging Face folders imported from GGUF files (the demo's SmolLM2, say)."""
        return self.home / "models"

    @property
    def fleet_pki(self) -> Path:
        return self.home / "fleet-pki"
