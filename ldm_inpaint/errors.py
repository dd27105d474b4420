"""The project's error types. Each is a ValueError whose message says what was expected and what was found;
the CLI prints it as one line and exits non-zero."""


class LdmInpaintError(ValueError):
    """Base class of every user-facing error."""


class ConfigError(LdmInpaintError):
    """A YAML config that does not describe a model we build."""


class CheckpointError(LdmInpaintError):
    """A file that is not a readable checkpoint, or whose weights do not match the config."""
