"""train.py with every micro-batch's forward made SECONDS slower: steps longer than torchrun's 30 s between SIGTERM
and SIGKILL, without a model that large. Test-only; no training config can slow a step.

    torchrun ... tests/process/train_slow.py SECONDS --config configs/qwen3_debug.toml [--section.key value ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: find train.py and recipes/

import train  # noqa: E402
from recipes import build  # noqa: E402

build_model = build.build_model


def build_slow_model(*args, seconds: float, **kwargs):
    model = build_model(*args, **kwargs)
    model.register_forward_pre_hook(lambda module, inputs: time.sleep(seconds))
    return model


if __name__ == "__main__":
    seconds = float(sys.argv[1])
    build.build_model = lambda *args, **kwargs: build_slow_model(*args, seconds=seconds, **kwargs)
    train.run(sys.argv[2:])
