"""`method.name: crash_test`: plain ERM that raises, as a killed process stops, at its `crash_at`-th training
forward (0: never). Resume tests set `CrashAt.calls, CrashAt.crash_at` before each fit, or call `killed_at`."""
import pytest

from longtail.methods import register_method
from longtail.methods.base import Method


class CrashAt(Method):
    calls = 0
    crash_at = 0

    def loss(self, model, x, y, progress):
        CrashAt.calls += 1
        if CrashAt.calls == CrashAt.crash_at:
            raise KeyboardInterrupt("simulated kill")
        return super().loss(model, x, y, progress)


register_method("crash_test", f"{__name__}:CrashAt")


def killed_at(fit, cfg, out, data_root, forward: int) -> None:
    """Train `cfg` (its method set to crash_test) into `out` until its `forward`-th training forward, as a kill
    would stop it; later fits of `cfg` run undisturbed."""
    cfg.method.name = "crash_test"
    CrashAt.calls, CrashAt.crash_at = 0, forward
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out, data_root=data_root)
    CrashAt.crash_at = 0
