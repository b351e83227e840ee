"""Synthetic corpus, JSONL -> indexed datasets, and per-domain GPTDatasets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from mixer.megatron.corpus import DOMAINS, write_synthetic_corpus
from mixer.megatron.data import (
    EOD,
    VOCAB_SIZE,
    ByteTokenizer,
    CorpusError,
    build_domain_datasets,
    decode,
    encode,
    prepare_corpus,
)


def read_texts(path: Path) -> list[str]:
    """The "text" fields of a JSONL file."""
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_corpus_is_deterministic_and_has_the_four_kinds(tmp_path: Path) -> None:
    names = write_synthetic_corpus(tmp_path / "a", seed=3, docs_per_domain=50)
    write_synthetic_corpus(tmp_path / "b", seed=3, docs_per_domain=50)
    write_synthetic_corpus(tmp_path / "c", seed=4, docs_per_domain=50)
    assert names == list(DOMAINS) == ["arith", "prose", "noise", "dupes"]
    for d in names:
        for split in ("train", "val"):
            a = (tmp_path / "a" / d / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / d / f"{split}.jsonl").read_bytes()
        assert a != (tmp_path / "c" / d / "val.jsonl").read_bytes()
    assert len(read_texts(tmp_path / "a" / "prose" / "train.jsonl")) == 50
    assert len(set(read_texts(tmp_path / "a" / "dupes" / "train.jsonl"))) <= 5
    assert len(set(read_texts(tmp_path / "a" / "prose" / "train.jsonl"))) == 50
    assert "=" in read_texts(tmp_path / "a" / "arith" / "train.jsonl")[0]


def test_tokenizer_roundtrip_and_vocab() -> None:
    text = "héllo, wörld = 42"
    ids = encode(text)
    assert ids.max() < 256 and decode(ids) == text
    assert decode(np.append(ids, EOD)) == text + "\n"
    tok = ByteTokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 257 and tok.eod == EOD == 256
    assert tok.detokenize(tok.tokenize(text)) == text


def test_prepare_roundtrip_decodes_to_the_text(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, seed=0, docs_per_domain=30)
    # A gzipped split must work the same way as a plain one.
    plain = corpus / "prose" / "val.jsonl"
    with gzip.open(corpus / "prose" / "val.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(plain.read_text())
    plain.unlink()
    prefixes = prepare_corpus(corpus, tmp_path / "out", progress=False)
    assert sorted(prefixes) == sorted(DOMAINS)
    for domain, splits in prefixes.items():
        for split, prefix in splits.items():
            src = corpus / domain / f"{split}.jsonl"
            if not src.exists():
                with gzip.open(str(src) + ".gz", "rt", encoding="utf-8") as fh:
                    texts = [json.loads(line)["text"] for line in fh]
            else:
                texts = read_texts(src)
            ds = IndexedDataset(prefix)
            assert len(ds) == len(texts)
            for i in (0, len(texts) - 1):
                tokens = ds[i]
                assert tokens[-1] == EOD
                assert decode(tokens[:-1]) == texts[i]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": \n', r"train\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r'train\.jsonl:3: missing "text"'),
        ('{"text": 5}\n', r'train\.jsonl:1: "text" must be a string'),
    ],
)
def test_prepare_names_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "c" / "web").mkdir(parents=True)
    (tmp_path / "c" / "web" / "train.jsonl").write_text(content)
    (tmp_path / "c" / "web" / "val.jsonl").write_text('{"text": "v"}\n')
    with pytest.raises(CorpusError, match=message):
        prepare_corpus(tmp_path / "c", tmp_path / "out", progress=False)


def test_prepare_missing_folder_or_split(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="corpus folder not found"):
        prepare_corpus(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "c" / "web").mkdir(parents=True)
    (tmp_path / "c" / "web" / "train.jsonl").write_text('{"text": "t"}\n')
    with pytest.raises(CorpusError, match=r"web: missing val\.jsonl"):
        prepare_corpus(tmp_path / "c", tmp_path / "out", progress=False)


def test_gpt_datasets_per_domain(domain_prefixes, cache_dir: Path) -> None:
    names, train, _ = domain_prefixes
    datasets = build_domain_datasets(train, seq_length=32, seed=0, num_samples=500, cache_dir=cache_dir)
    assert len(datasets) == len(names)
    for ds in datasets:
        assert len(ds) >= 500
        item = ds[0]
        assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (32,)
        assert item["position_ids"].tolist() == list(range(32))
        assert int(item["tokens"].max()) < VOCAB_SIZE
        # labels are the tokens shifted by one
        assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
    again = build_domain_datasets(train, seq_length=32, seed=0, num_samples=500, cache_dir=cache_dir)
    assert all(a[7]["tokens"].tolist() == b[7]["tokens"].tolist() for a, b in zip(datasets, again))
    with pytest.raises(CorpusError, match="prepare_corpus"):
        build_domain_datasets([train[0] + "-missing"], 32, 0, 10, cache_dir)


def test_tokenizer_contract_with_the_installed_megatron_core(domain_prefixes, cache_dir: Path) -> None:
    # GPTDataset reads .vocab_size and .eod from the tokenizer, and its cache key serialises it
    # through .unique_identifiers; a plain object with those three raises AttributeError on
    # anything more, so a megatron-core that reads another attribute fails here, not in a run.
    class Minimal:
        vocab_size = VOCAB_SIZE
        eod = EOD
        unique_identifiers: ClassVar[dict[str, str]] = {"class": "Minimal"}

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, train, _ = domain_prefixes
    config = GPTDatasetConfig(
        random_seed=0,
        sequence_length=16,
        blend=([train[0]], None),
        split="100,0,0",
        tokenizer=Minimal(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache_dir / "minimal"),
    )
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    ds = BlendedMegatronDatasetBuilder(GPTDataset, [40, 0, 0], lambda: True, config).build()[0]
    raw = IndexedDataset(train[0])
    stream = np.concatenate([raw[i] for i in range(len(raw))])
    # Every sample is a window of the shuffled document stream: its tokens are bytes or EOD, and
    # each EOD in a sample stands where a document of the corpus ends.
    seen_eod = False
    for i in range(len(ds)):
        tokens = ds[i]["tokens"].numpy()
        assert tokens.max() <= EOD and tokens.min() >= 0
        seen_eod |= bool((tokens == EOD).any())
    assert seen_eod and (stream == EOD).sum() == len(raw)
