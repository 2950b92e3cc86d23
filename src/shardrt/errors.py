"""The error hierarchy: every failure a user can cause or meet is one of these.

A message names the field and the value and says what would be accepted; the CLI prints
it as one line and exits with code 2.
"""


class ShardrtError(Exception):
    """Base of every error shardrt raises on purpose."""


class ConfigError(ShardrtError):
    """A flag, environment variable or configuration value is not acceptable."""


class PlacementError(ConfigError):
    """A placement (devices, layer split, YAML placement file) is not acceptable."""


class ModelFormatError(ShardrtError):
    """A GGUF file is unreadable, truncated, or holds something shardrt cannot run."""


class ModelFetchError(ShardrtError):
    """The demo model could not be fetched into the cache."""


class IpcError(ShardrtError):
    """A message or payload between processes is malformed or could not be delivered."""


class StageDied(ShardrtError):
    """A stage's process exited or stopped answering."""
