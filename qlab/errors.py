"""One error type for bad user input: the entry points print its message without a traceback."""


class QlabError(RuntimeError):
    """A problem with the user's input or files; the message says what was wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """`Type: first sentence` of an exception, for a message that quotes what went wrong."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0].split('. ')[0] if text else 'no message'}"
