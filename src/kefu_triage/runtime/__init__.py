"""The serving side: load an exported artifact and triage messages (onnxruntime, tokenizers, numpy; no torch)."""

from kefu_triage.core.artifact import ArtifactError
from kefu_triage.runtime.model import TriageModel

__all__ = ["ArtifactError", "TriageModel"]
