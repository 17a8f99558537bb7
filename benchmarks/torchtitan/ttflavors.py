# Registers attention-backend flavors of torchtitan 0.2.2's Qwen3 (loaded with --experimental.custom_import):
# "<flavor>_<backend>_<mask>", e.g. 0.6B_varlen_block_causal, for benchmarks/benchmark.py's baseline runs.
import dataclasses

from torchtitan.models.qwen3 import qwen3_args

for flavor in ("0.6B", "1.7B"):
    for backend, mask in [("sdpa", "causal"), ("flex", "causal"), ("flex", "block_causal"), ("varlen", "block_causal")]:
        qwen3_args[f"{flavor}_{backend}_{mask}"] = dataclasses.replace(
            qwen3_args[flavor], attn_type=backend, attn_mask_type=mask, max_seq_len=40960
        )
