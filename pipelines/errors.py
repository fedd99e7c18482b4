"""The exceptions the runtime raises: one-line reasons a worker or a command can show as is."""


class PipelineError(Exception):
    """Base of every runtime failure that is not a programming error."""


class ModelError(PipelineError):
    """A model folder that is missing, malformed, or whose weights fail their sha256."""


class InferenceError(PipelineError):
    """A generator that failed while running (out of memory, bad output shape, NaNs)."""


def one_line(exc: BaseException) -> str:
    """The reason for one status or stderr line: a pipeline error's own message; anything else
    with its type (``KeyError: 'x'`` says little without it) and its last non-empty line only
    (SimpleITK and torch put a C++ location first and the cause last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if isinstance(exc, PipelineError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
