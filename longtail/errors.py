"""Errors a user can cause or act on. The CLI prints their message without a traceback and exits 2."""


class LongtailError(Exception):
    """Base of the errors the CLI reports as plain messages."""


class ConfigError(LongtailError):
    """A bad config key or value, a missing or broken file, a wrong input: the message names it
    (key, file or line) and says what is accepted."""


class DivergedError(LongtailError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""
