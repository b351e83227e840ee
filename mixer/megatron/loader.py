"""This rank's micro-batches over the live mixture: a Megatron external data iterator.

A torch DataLoader (workers, prefetching) over one dataset per domain, whose batch sampler draws
the global batch from the live weights (mixer.megatron.sampler) and yields this data-parallel
rank's share in micro-batches. Versions come from announce.AnnouncedVersions at the iteration's
first micro-batch; each micro-batch's domain ids, sample ids, step and version travel beside it
(MicroBatchMeta), not in Megatron's batch dict.

`with_topics` wraps the per-domain datasets so that every sample also carries `topic_ids`: the
topics `mixer topics build` gave the documents it spans (mixer.topics.SampleTopics), a row of k
ids padded with -1, which topic weighting (ToReMi) and the topic reports read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mixer.megatron.announce import Announced, AnnouncedVersions
from mixer.megatron.sampler import MixtureDataset, MixtureSampler, StepBatchSampler
from mixer.topics import SampleTopics, TopicsError

__all__ = ["MicroBatchMeta", "MixtureLoader", "TopicDataset", "domain_datasets", "with_topics"]

_STATE_FORMAT = 1


@dataclass(kw_only=True)
class MicroBatchMeta:
    """What the loss needs beyond Megatron's batch: domains, sample ids, and where it stands."""

    dataset_id: Tensor  # [mbs] int64
    sample_id: Tensor  # [mbs] int64
    step: int
    index: int  # micro-batch index within the step
    num_microbatches: int
    version: int
    train: bool = True

    def pack(self) -> Tensor:
        head = torch.tensor([self.step, self.index, self.num_microbatches, self.version, int(self.train)])
        return torch.cat([head, self.dataset_id.reshape(-1).cpu(), self.sample_id.reshape(-1).cpu()])

    @classmethod
    def unpack(cls, packed: Tensor) -> MicroBatchMeta:
        v = packed.cpu()
        n = (v.numel() - 5) // 2
        return cls(
            step=int(v[0]),
            index=int(v[1]),
            num_microbatches=int(v[2]),
            version=int(v[3]),
            train=bool(v[4]),
            dataset_id=v[5 : 5 + n].clone(),
            sample_id=v[5 + n :].clone(),
        )


class MixtureLoader:
    """This rank's micro-batches over the live mixture (a Megatron external data iterator)."""

    def __init__(
        self,
        datasets: Sequence[Any],
        sampler: MixtureSampler,
        *,
        micro_batch_size: int,
        channel: AnnouncedVersions | None = None,
        weighting: Any = None,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        train: bool = True,
    ) -> None:
        local = sampler.global_batch_size // sampler.dp_size
        if local % micro_batch_size:
            raise ValueError(
                f"per-rank batch {local} (global {sampler.global_batch_size} / {sampler.dp_size} data-parallel "
                f"ranks) is not a multiple of the micro-batch size {micro_batch_size}"
            )
        self.sampler = sampler
        self.num_microbatches = local // micro_batch_size
        self.channel = channel
        self.weighting = weighting
        self.train = train
        self.batches = StepBatchSampler(sampler, micro_batch_size=micro_batch_size)
        self.step = sampler.step
        self.index = 0
        self.last_meta: MicroBatchMeta | None = None
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": True}
        self._loader = DataLoader(
            MixtureDataset(datasets), batch_sampler=self.batches, num_workers=num_workers, **kwargs
        )
        self._it: Iterator[dict[str, Tensor]] | None = None
        # How far a prefetching DataLoader can have drawn ahead of the step being trained.
        ahead = num_workers * prefetch_factor if num_workers > 0 else 1
        self.horizon = math.ceil(ahead / self.num_microbatches) + 1
        if channel is not None:
            channel.horizon = max(channel.horizon, self.horizon)

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self.index == 0 and self.channel is not None:
            for announced in self.channel.tick(self.step):
                self._install(announced)
        if self._it is None:
            self._it = iter(self._loader)
        item = next(self._it)
        self.last_meta = MicroBatchMeta(
            dataset_id=item.pop("dataset_id"),
            sample_id=item.pop("sample_id"),
            step=self.step,
            index=self.index,
            num_microbatches=self.num_microbatches,
            version=self.batches.versions[self.step],
            train=self.train,
        )
        self.index += 1
        if self.index == self.num_microbatches:
            self.batches.versions.pop(self.step, None)
            self.step, self.index = self.step + 1, 0
        return item

    def _install(self, announced: Announced) -> None:
        u = announced.update
        if (
            self.sampler.set_weights(u.weights, u.version, announced.apply_step)
            and self.weighting is not None
        ):
            self.weighting.offer(u)

    def version_at(self, step: int) -> int:
        """The version in force for `step` (from the sampler's record of applied versions)."""
        version = self.sampler.applied[0][0]
        for v, s in self.sampler.applied:
            if s <= step:
                version = v
        return version

    def save_state(self) -> dict[str, Any]:
        """The state before the next step to train (Megatron-LM's dataloader checkpoint hook)."""
        if self.index:
            raise RuntimeError(f"checkpoint in the middle of step {self.step} (micro-batch {self.index})")
        return {"format": _STATE_FORMAT, "step": self.step, "sampler": self.batches.state_before(self.step)}

    def load_state(self, state: dict[str, Any], force: bool = False) -> None:
        if self._it is not None:
            raise RuntimeError("load_state before the first batch is drawn")
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown mixer loader state format {state.get('format')!r}")
        self.sampler.load_state_dict(state["sampler"], force=force)
        self.step, self.index = int(state["step"]), 0


def domain_datasets(
    config: Any, prefixes: Sequence[str], split: str, built_on_rank: bool = True
) -> list[Any]:
    """One GPTDataset per prefix from the user's GPTDatasetConfig (tokenizer, --split, seed, cache).

    Collective when torch.distributed is up (megatron-core's builder builds on rank 0 first, then
    the others, with barriers): every rank calls it; ranks that read no data get None datasets.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    which = {"train": 0, "valid": 1, "test": 2}[split]
    out = []
    for prefix in prefixes:
        cfg = replace(config, blend=([prefix], None), blend_per_split=None)
        built = BlendedMegatronDatasetBuilder(
            GPTDataset, [None, None, None], lambda: built_on_rank, cfg
        ).build()
        if not built_on_rank:
            out.append(None)
            continue
        if built[which] is None or len(built[which]) == 0:
            raise ValueError(f"{prefix}: the {split} split is empty under --split {cfg.split!r}")
        out.append(built[which])
    return out


class TopicDataset(torch.utils.data.Dataset):
    """A Megatron dataset whose samples also carry `topic_ids` ([k] int32, -1 padded)."""

    def __init__(self, dataset: Any, topics: SampleTopics) -> None:
        self.dataset, self.topics = dataset, topics

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["topic_ids"] = torch.from_numpy(self.topics.row(int(index)))
        return item


def with_topics(datasets: Sequence[Any], prefixes: Sequence[str]) -> list[TopicDataset]:
    """Each domain's dataset with its samples' topics, read from `<prefix>.topics.npy/.json`.

    All domains must come from one `mixer topics build` (the same k): topic ids are shared."""
    if len(datasets) != len(prefixes):
        raise ValueError(f"{len(datasets)} datasets for {len(prefixes)} prefixes")
    out = [TopicDataset(d, SampleTopics.load(d, p)) for d, p in zip(datasets, prefixes, strict=True)]
    widths = {t.topics.width for t in out}
    if len(widths) > 1:
        raise TopicsError(
            f"the domains' topic files come from builds with different k ({sorted(widths)}); "
            "label all domains with one `mixer topics build`"
        )
    return out
