"""Typed errors: each carries a message a user can act on, and the CLI prints it as one line."""


class ApertusError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


class ModelNotFoundError(ApertusError):
    """The model is neither a local directory nor in the local Hugging Face cache."""

    exit_code = 2


class CheckpointError(ApertusError):
    """A checkpoint exists but cannot be used as it is."""

    exit_code = 2


class ConfigError(CheckpointError):
    """config.json is missing, unreadable or describes something we cannot run."""


class UnsupportedModelError(ConfigError):
    """config.json names another architecture."""


class WeightsError(CheckpointError):
    """The tensors do not match the architecture: missing, unexpected or mis-shaped."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file is truncated or malformed."""


class TokenizerError(CheckpointError):
    """tokenizer.json or the chat template cannot be used."""


class NetworkError(ApertusError):
    """The hub cannot be reached, or a download failed on the way."""


class CacheError(ApertusError):
    """The local model cache cannot be changed (read-only, busy)."""


class DestinationError(ApertusError):
    """An output cannot be written: read-only, full, or being written by another process."""


class UsageError(ApertusError):
    """Bad input from the user (flags, prompt)."""

    exit_code = 2


class FilterFormatError(ApertusError):
    """An output filter file is unreadable or does not follow the documented format."""

    exit_code = 2


class FilterInstallError(ApertusError):
    """The installed output filter cannot be used; generation refuses to run unfiltered."""


class StoreError(ApertusError):
    """The history database cannot be opened, read or written (disk full, locked, read-only)."""


class UnknownConversationError(StoreError):
    """No conversation, or more than one, has the id or prefix the user typed."""

    exit_code = 2


class DraftMismatchError(UsageError):
    """A draft model for speculative decoding does not share the model's vocabulary."""
