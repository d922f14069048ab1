"""The one exception type of the checkpoint package."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says what is wrong and where."""
