"""Byte-level tokenizer, JSONL -> Megatron indexed datasets, and one GPTDataset per domain.

Tokenizer: a token is one byte of the UTF-8 encoding (ids 0..255); id 256 (EOD) ends every
document, so the vocabulary has 257 entries. The tokenizer object handed to megatron-core is ours
(`ByteTokenizer`): GPTDataset reads only `.vocab_size` and `.eod` from it, and megatron-core's own
null tokenizer changed its library name ("null" -> "null-text") and its ids between 0.16 and 0.17.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from mixer.megatron.config import VOCAB_SIZE

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset

__all__ = [
    "EOD",
    "SPLITS",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "CorpusError",
    "build_domain_datasets",
    "decode",
    "encode",
    "gpt_config",
    "prepare_corpus",
]

EOD = 256
SPLITS = ("train", "val")
# Token ids fit in uint16; megatron-core reads the dtype back from the .idx header.
TOKEN_DTYPE = np.uint16

log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A corpus file is missing or malformed; the message names the file (and line)."""


def encode(text: str) -> np.ndarray:
    """Text to token ids (its UTF-8 bytes), without the EOD token."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(TOKEN_DTYPE)


def decode(ids) -> str:
    """Token ids back to text; EOD tokens become newlines, anything else above 255 is dropped."""
    arr = np.asarray(ids, dtype=np.int64).ravel()
    out = bytearray()
    for tok in arr.tolist():
        if tok == EOD:
            out.append(0x0A)
        elif 0 <= tok < 256:
            out.append(tok)
    return out.decode("utf-8", errors="replace")


class ByteTokenizer:
    """The byte-level tokenizer as megatron-core's GPTDataset uses one (`vocab_size`, `eod`)."""

    vocab_size = VOCAB_SIZE
    eod = EOD
    # GPTDataset's cache key serialises unknown objects through their unique_identifiers.
    unique_identifiers: ClassVar[dict[str, Any]] = {
        "class": "mixer.ByteTokenizer",
        "vocab_size": VOCAB_SIZE,
        "eod": EOD,
    }

    def tokenize(self, text: str) -> list[int]:
        return encode(text).tolist()

    def detokenize(self, ids) -> str:
        return decode(ids)


def _find_split(domain_dir: Path, split: str) -> Path:
    """The JSONL file of one split, plain or gzipped."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        path = domain_dir / name
        if path.is_file():
            return path
    raise CorpusError(f"{domain_dir}: missing {split}.jsonl (or {split}.jsonl.gz)")


def _read_texts(path: Path, bar: tqdm) -> Iterator[str]:
    """Yield the "text" field of each line, with clear errors naming file and line."""
    with path.open("rb") as raw:
        # Progress follows the bytes read from disk, so gzipped files advance the bar correctly.
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        fh = io.TextIOWrapper(stream, encoding="utf-8")
        seen, lineno = 0, 0
        while True:
            try:
                line = fh.readline()
            except (UnicodeDecodeError, OSError, EOFError) as exc:
                raise CorpusError(f"{path}:{lineno + 1}: cannot read ({exc})") from None
            if not line:
                return
            lineno += 1
            pos = raw.tell()
            bar.update(pos - seen)
            seen = pos
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise CorpusError(f'{path}:{lineno}: missing "text" field')
            if not isinstance(obj["text"], str):
                kind = type(obj["text"]).__name__
                raise CorpusError(f'{path}:{lineno}: "text" must be a string, got {kind}')
            yield obj["text"]


def _write_indexed(texts: Iterator[str], prefix: Path) -> int:
    """Write one .bin/.idx pair; returns the number of documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=TOKEN_DTYPE)
    count = 0
    for text in texts:
        ids = np.append(encode(text), TOKEN_DTYPE(EOD))
        builder.add_document(torch.from_numpy(ids), [len(ids)])
        count += 1
    builder.finalize(str(prefix) + ".idx")
    return count


def prepare_corpus(corpus_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, dict[str, str]]:
    """Turn every <domain>/{train,val}.jsonl[.gz] into indexed datasets under out_dir/<domain>/."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"{corpus_dir}: corpus folder not found")
    domains = sorted(p for p in corpus_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise CorpusError(f"{corpus_dir}: no domain folders (expected <domain>/train.jsonl)")
    # Find every file before writing anything, so a missing split fails fast.
    files = {d.name: {s: _find_split(d, s) for s in SPLITS} for d in domains}
    total = sum(p.stat().st_size for splits in files.values() for p in splits.values())
    # Import megatron-core (seconds) before the bar starts, so the bar measures the work.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    prefixes: dict[str, dict[str, str]] = {}
    # delay: the bar only appears when preparing takes more than a second.
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress, delay=1.0) as bar:
        for domain, splits in files.items():
            (out_dir / domain).mkdir(parents=True, exist_ok=True)
            prefixes[domain] = {}
            for split, path in splits.items():
                prefix = out_dir / domain / split
                n = _write_indexed(_read_texts(path, bar), prefix)
                if n == 0:
                    raise CorpusError(f"{path}: no documents")
                log.info("%s/%s: %d documents -> %s", domain, split, n, prefix)
                prefixes[domain][split] = str(prefix)
    return prefixes


def gpt_config(seq_length: int, seed: int, cache_dir: Path | str | None, split: str = "100,0,0"):
    """megatron-core's GPTDatasetConfig for our byte-level data (no blend yet: one per domain follows)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        split=split,
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # The causal attention builds its own mask; a dense [1, s, s] mask per sample is waste.
        create_attention_mask=False,
        path_to_cache=None if cache_dir is None else str(cache_dir),
    )


def build_domain_datasets(
    prefixes: list[str],
    seq_length: int,
    seed: int,
    num_samples: int | None,
    cache_dir: Path,
) -> list[GPTDataset]:
    """One megatron GPTDataset per prefix, each sized for num_samples (None: one epoch)."""
    # megatron caches its shuffle indices keyed by path and settings, not file contents: pass a
    # cache_dir that is fresh whenever the data under a prefix is rewritten.
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    datasets: list[GPTDataset] = []
    for prefix in prefixes:
        if not Path(prefix + ".idx").is_file() or not Path(prefix + ".bin").is_file():
            raise CorpusError(f"{prefix}: missing .bin/.idx (run prepare_corpus first)")
        config = replace(gpt_config(seq_length, seed, cache_dir), blend=([prefix], None))
        # A single-prefix blend yields the GPTDataset itself (no BlendedDataset around it).
        built = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
        datasets.append(built[0])
    return datasets
