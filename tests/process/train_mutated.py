"""train.py with torchtitan 0.2.1's varlen layout mistake injected into the model it builds: the run "from the
mutated model" that the comparison checks must reject. Test-only; a training config cannot reach the mutation.

    python tests/process/train_mutated.py --config configs/qwen3_varlen.toml [--section.key value ...]

Same arguments, seed, data and outputs as train.py; only each layer's varlen attention output is permuted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: find train.py and recipes/

import train  # noqa: E402
from recipes import build  # noqa: E402
from recipes.qwen3.mutation import inject_varlen_layout_mistake  # noqa: E402

build_correct_model = build.build_model


def build_mutated_model(*args, **kwargs):
    return inject_varlen_layout_mistake(build_correct_model(*args, **kwargs))


if __name__ == "__main__":
    build.build_model = build_mutated_model  # train.py looks the builder up at call time
    sys.exit(train.main(sys.argv[1:]))
