"""Typed errors raised by editops' editing layer.

Every error carries a message that tells the user what to change. Callers catch
``EditopsError`` to handle any of them.
"""
from __future__ import annotations


class EditopsError(Exception):
    """Base class of every error editops raises on purpose."""


class ModelLoadError(EditopsError):
    """A model or tokenizer could not be loaded (missing path, offline hub id, bad file)."""


class GGUFError(ModelLoadError):
    """A GGUF file is missing, truncated or not a model transformers can dequantise."""


class UnsupportedArchitectureError(EditopsError):
    """No adapter knows where this architecture keeps its MLP output projection."""


class HyperparameterError(EditopsError):
    """An editor setting has a value the editor does not know."""


class RequestError(EditopsError):
    """An edit request is malformed or cannot be applied to this model/tokenizer."""


class SubjectNotInPromptError(RequestError):
    """The subject string does not occur in the prompt template."""


class EmptyTargetError(RequestError):
    """The new target is empty or whitespace."""


class PromptTooLongError(RequestError):
    """The prompt (plus target) is longer than the model's context."""


class NoOpEditError(RequestError):
    """The model already produces the requested target: nothing to edit."""


class NothingToDeleteError(RequestError):
    """The unwanted output does not occur for the given source: nothing to delete."""


class DeltaError(EditopsError):
    """A delta file is corrupt, tampered with, or does not fit the model."""


class IntegrityError(DeltaError):
    """A stored sha256 does not match the content."""


class FingerprintMismatchError(DeltaError):
    """A delta was computed for a different base model."""


class StateError(EditopsError):
    """An editor state does not fit the editor or model it is loaded for."""


class FormatError(EditopsError):
    """A request file is in no format editops reads, or a record misses fields."""


# ---------------------------------------------------------------- registry (issue 5)
class RegistryError(EditopsError):
    """The model registry (MLflow) refused or could not complete an operation."""


class RegistryUnavailableError(RegistryError):
    """The tracking/registry server could not be reached after retries with backoff."""


class RegistryAuthError(RegistryError):
    """The tracking server refused the credentials (or their absence)."""


class LineNotFoundError(RegistryError):
    """No model line (registered model) of that name exists."""


class VersionNotFoundError(RegistryError):
    """The version (number or alias) does not exist in the line."""


class MissingParentError(RegistryError):
    """A version's parent (or a version in its ancestry) is missing from the registry."""


class StaleParentError(RegistryError):
    """Compare-and-set failed: the line's head is no longer the parent the caller built on."""


class ImmutableVersionError(RegistryError):
    """An attempt to re-register or overwrite an existing, immutable version."""


class ArtifactMissingError(RegistryError):
    """A version's artifact is missing from the artifact store."""


class PromotionRefusedError(RegistryError):
    """An alias move was refused by the promotion policy (e.g. gates did not pass)."""


class RevertError(RegistryError):
    """A request's change cannot be reverted as asked."""


class ExportError(RegistryError):
    """A version cannot be exported in the asked format."""


class MetricsError(EditopsError):
    """Metrics cannot be computed as asked (e.g. cached base outputs do not cover the requests)."""
