"""The project's error types. Each is a ValueError whose message says what was expected and what was found;
the CLI prints it as one line and exits non-zero."""


class LdmInpaintError(ValueError):
    """Base class of every user-facing error."""


class ConfigError(LdmInpaintError):
    """A YAML config that does not describe a model we build."""


class CheckpointError(LdmInpaintError):
    """A file that is not a readable checkpoint, or whose weights do not match the config."""


class Cancelled(Exception):  # noqa: N818 - the name says what happened, as asyncio's CancelledError does
    """Raised from a step callback to stop a pipeline call; the call then raises it again, having let go of
    what it held. Not an :class:`LdmInpaintError`: nothing was wrong with the input."""


class LoRAError(LdmInpaintError):
    """A LoRA file that cannot be read, or whose modules do not fit the model it is applied to."""
