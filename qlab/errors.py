"""One error type for bad user input: the entry points print its message without a traceback."""


class QlabError(RuntimeError):
    """A problem with the user's input or files; the message says what was wrong and how to fix it."""
