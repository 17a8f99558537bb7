"""train.py with a deliberate attention bug injected into the model it builds: a run "from a broken backend" that
the comparison checks must reject. Test-only; a training config cannot reach the mutations.

    python tests/process/train_mutated.py MUTATION --config configs/qwen3_varlen.toml [--section.key value ...]

MUTATION is one of recipes.qwen3.mutation.MUTATIONS: layout (torchtitan 0.2.1's varlen output layout; varlen
only), leak (the document mask leaks across documents), scale (the softmax scale applied twice). Same arguments,
seed, data and outputs as train.py; only the attention is broken.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: find train.py and recipes/

import train  # noqa: E402
from recipes import build  # noqa: E402
from recipes.qwen3.mutation import MUTATIONS  # noqa: E402

build_correct_model = build.build_model


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MUTATIONS:
        print(
            f"usage: train_mutated.py {{{','.join(MUTATIONS)}}} --config FILE [--section.key value ...]",
            file=sys.stderr,
        )
        sys.exit(2)
    inject = MUTATIONS[sys.argv[1]]
    # train.py looks the builder up at call time
    build.build_model = lambda *args, **kwargs: inject(build_correct_model(*args, **kwargs))
    sys.exit(train.main(sys.argv[2:]))
