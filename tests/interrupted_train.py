"""`python -m r3v_fast.train` that is interrupted (as by Ctrl-C, on every rank) when training
reaches optimizer step R3V_INTERRUPT_AT_STEP; a launcher script for the multi-process tests in
tests/test_train.py, which cannot patch a function inside processes that accelerate starts."""

import os
import sys

from r3v_fast import train
from r3v_fast.engine import trainer

_STEP = int(os.environ["R3V_INTERRUPT_AT_STEP"])
_real_step = trainer.Trainer._step


def _interrupted_step(self, wrapper, optimizer, scheduler, step_batch, step):
    if step == _STEP:
        raise KeyboardInterrupt
    return _real_step(self, wrapper, optimizer, scheduler, step_batch, step)


trainer.Trainer._step = _interrupted_step

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
