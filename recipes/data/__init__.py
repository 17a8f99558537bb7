"""Data, by job: sources.py (where documents come from), tokenizer.py, cache.py (built once per machine) and
loader.py (packed, resumable rows with their document starts). What train.py and the scripts call is here."""

from recipes.data.cache import default_cache_dir
from recipes.data.loader import Batch, build_dataloader, heldout_batches
from recipes.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["Batch", "Tokenizer", "build_dataloader", "build_tokenizer", "default_cache_dir", "heldout_batches"]
