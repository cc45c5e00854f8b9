"""Errors a user can fix: they are reported as one line, never as a traceback."""


class CspexpError(Exception):
    """Base of every error that is the user's input, not a bug: bad config value, missing path."""


class ConfigError(CspexpError, ValueError):
    """A config value is outside what is allowed. The message names the key and the allowed values."""


class MissingPathError(CspexpError, FileNotFoundError):
    """A path given in the config (model dir, dataset root, ...) does not exist."""


def require(condition: bool, message: str) -> None:
    """Raise a ConfigError with `message` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


class OutputError(CspexpError, OSError):
    """A file or directory cspexp must write cannot be written (not a directory, not writable, disk
    full). The message names the path."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (continuation lines joined)."""
    text = ""
    for line in (line.strip() for line in str(exc).splitlines()):
        if line:
            text += (" " if text.endswith(":") else "; ") + line if text else line
    if isinstance(exc, KeyError):  # its message is only the key
        return f"KeyError {text}"
    return text or type(exc).__name__
