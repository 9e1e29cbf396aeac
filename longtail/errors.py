"""Errors a user can cause or act on. The CLI prints their message without a traceback and exits 2."""


class LongtailError(Exception):
    """Base of the errors the CLI reports as plain messages."""


class ConfigError(LongtailError):
    """A bad config key or value, a missing or broken file, a wrong input: the message names it
    (key, file or line) and says what is accepted."""


class ArgumentError(ConfigError):
    """A bad value of a Python argument, named as the function's signature names it (`topk=11: ...`). A
    command that passes a flag's value on re-words it as that flag with `as_flag`."""

    def __init__(self, argument: str, value: object, reason: str):
        super().__init__(f"{argument}={value!r}: {reason}")
        self.argument, self.value, self.reason = argument, value, reason

    def as_flag(self) -> ConfigError:
        """The same error as the command line spells the argument: `--topk 11: ...`."""
        return ConfigError(f"--{self.argument} {self.value}: {self.reason}")


class DivergedError(LongtailError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""
