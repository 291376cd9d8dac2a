"""Exception types raised for errors a user can fix (bad file, bad config, bad shape)."""


class CaftError(Exception):
    """Base class for errors a user can fix; the message names the thing and the fix."""


class ConfigError(CaftError):
    """A model or run configuration is invalid or unsupported."""


class CheckpointError(CaftError):
    """A checkpoint file or directory is missing, truncated or inconsistent."""


class ProjectorError(CaftError):
    """Ablation directions are malformed."""


class DataError(CaftError):
    """A dataset file or record is malformed."""
