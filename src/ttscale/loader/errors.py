"""The one error type for model files that cannot be loaded."""


class ModelLoadError(ValueError):
    """A model file is missing, malformed or uses something ttscale does not support.

    The message names the file and says what is wrong in one sentence, so callers (the CLI)
    can print it as-is instead of a stack trace.
    """
