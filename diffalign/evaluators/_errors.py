"""Errors with no heavy imports, so that ``import diffalign.evaluators`` stays cheap."""


class WeightsNotFoundError(RuntimeError):
    """Scorer weights are neither on this machine nor downloadable. The message is one line that names the id and
    where to put the files; the CLI prints it without a traceback."""
