# Sourced by the 1×H200 scripts from the repository root, with $wheels set: installs the wheels the GPU image lacks
# into /tmp/site, sets PYTHONPATH and the run environment, and, where $tokenizer is set, leaves it pointing at a
# folder with tokenizer.json (unpacking tokenizer.json.xz where benchmarks/prepare_qwen3_tokenizer.sh packed it).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline RECIPES_CACHE=${RECIPES_CACHE:-/tmp/recipes-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -z "${tokenizer:-}" ] || [ -f "$tokenizer/tokenizer.json" ] || { mkdir -p /tmp/qwen3-tok \
  && cp "$tokenizer/tokenizer_config.json" /tmp/qwen3-tok/ \
  && xz -dc "$tokenizer/tokenizer.json.xz" > /tmp/qwen3-tok/tokenizer.json && tokenizer=/tmp/qwen3-tok; }
