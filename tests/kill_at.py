"""Run the imgcls command line in this process and kill it with SIGKILL at an exact instant: a real
kill, with no chance to clean up, at a chosen boundary between two writes.

    python tests/kill_at.py WHEN N imgcls-arguments...

WHEN is a file name (`last.ckpt`, `best.ckpt`, `model.safetensors`): the process dies just before
its N-th atomic write of that file; or `module:function`: just before the N-th call of it.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from pathlib import Path


def die_before(function, should_die):
    calls = {"count": 0}

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if should_die(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == count:
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    when, count, arguments = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if ":" in when:
        module_name, name = when.split(":")
        module = importlib.import_module(module_name)
        setattr(module, name, die_before(getattr(module, name), lambda *args, **kwargs: True))
    else:
        import imgcls.checkpoint

        imgcls.checkpoint.atomic_write = die_before(imgcls.checkpoint.atomic_write,
                                                    lambda path, data: Path(path).name == when)
    from imgcls.cli import main

    sys.exit(main(arguments))
