"""The exceptions the runtime raises: one-line reasons a worker or a command can show as is."""


class PipelineError(Exception):
    """Base of every runtime failure that is not a programming error."""


class ModelError(PipelineError):
    """A model folder that is missing, malformed, or whose weights fail their sha256."""


class InferenceError(PipelineError):
    """A generator that failed while running (out of memory, bad output shape, NaNs)."""
