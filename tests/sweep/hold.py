"""A callback for the sweep tests: a trial's training waits at its start until the file named by
``$IMPLICIT_EM_TEST_RELEASE`` exists, so a test sees its trials RUNNING together and kills one mid-trial
however fast the machine trains (no race between the test's polling and a trial of a second)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class HoldUntilReleased(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        release = Path(os.environ["IMPLICIT_EM_TEST_RELEASE"])
        deadline = time.monotonic() + 600
        while not release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{release} was never created")
            time.sleep(0.1)
