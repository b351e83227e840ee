"""The Megatron-LM plug-in: a `pretrain_gpt.py` run draws from live mixer weights and reports.

README ("Attaching Megatron-LM") shows the change to `pretrain_gpt.py`; it calls four things:

- `add_arguments(parser)`: the `--mixer-*` options (through `extra_args_provider`);
- `datasets_provider(config, train_val_test_num_samples, vp_stage)`: with
  `--dataloader-type external`, this rank's train and validation iterators over one `GPTDataset`
  per domain of the job spec, built from the user's own `GPTDatasetConfig` (tokenizer, sequence
  length, `--split`, seed, cache); None on ranks that read no data;
- `batch_meta(data_iterator, vp_stage)`: the micro-batch's domain ids, sample ids, step and
  version on every tensor-parallel rank of the last pipeline stage (Megatron's own batch
  broadcast carries only its fixed keys);
- `wrap_loss(loss_func, loss_mask, meta)`: the user's `loss_func` with instance weights applied to
  the per-token losses it receives (its `(loss, num_tokens, report)` contract unchanged), and the
  step's per-domain sums and per-sample losses accumulated on the device, with no collective and
  no host sync, then reduced once per iteration over data x context parallel ranks on the last
  stage; exactly one rank (last stage, tensor/data/context rank 0) holds the session and reports.

Loss normalisation (Sow et al.: the weighted loss sum over the global token count): the wrapper
hands Megatron `sum_b w_b S_b` and the unweighted token count. With `--calculate-per-token-loss`
Megatron divides by the token count summed over micro-batches and data-parallel ranks, which is
exactly that; without it Megatron takes a token mean per micro-batch and averages, which equals it
when every micro-batch holds the same number of loss tokens (full sequences, no EOD masking).
Instance weights are normalised over the data-parallel micro-batch (the losses of later
micro-batches do not exist yet when a micro-batch's weights are needed).

Versions reach every loader rank through `announce.AnnouncedVersions` (no host barrier; applied
at one announced step on every rank and DataLoader worker). Checkpoints: Megatron-LM saves the
iterator's `save_state()` through its `--dataloader-save` hook (`maybe_save_dataloader_state`);
`datasets_provider` loads it back for `args.iteration`. The sampler draws the global batch, so a
resume with another data-parallel size continues the same global sample sequence.
"""

from __future__ import annotations

import atexit
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mixer.megatron.announce import Announced, AnnouncedVersions
from mixer.megatron.loss import AsyncHostCopy, HostStats, StepStats, reduce_step_stats
from mixer.megatron.sampler import MixtureDataset, MixtureSampler, StepBatchSampler

__all__ = [
    "LMSettings",
    "MicroBatchMeta",
    "MixtureLoader",
    "Topology",
    "add_arguments",
    "batch_meta",
    "datasets_provider",
    "wrap_loss",
]

log = logging.getLogger(__name__)

_STATE_FORMAT = 1


@dataclass(kw_only=True)
class LMSettings:
    """What the plug-in needs from Megatron's arguments (`settings_from_args`)."""

    spec: Any  # mixer.spec.JobSpec
    micro_batch_size: int
    global_batch_size: int
    num_workers: int = 2
    prefetch_factor: int = 2
    sync_interval: int = 1
    """Iterations between version announcements (each one an asynchronous gloo broadcast)."""
    address: str | None = None
    token: str | None = None
    source: str = "megatron"
    load: str | None = None
    iteration: int = 0


@dataclass(kw_only=True)
class Topology:
    """This rank's place in megatron-core's parallel state, and the groups the plug-in uses."""

    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_src: int = 0
    cp_size: int = 1
    first_stage: bool = True
    last_stage: bool = True
    dp_group: Any = None
    dp_cp_group: Any = None
    cp_group: Any = None
    tp_group: Any = None
    channel_group: Any = None
    channel_src: int = 0
    cp_rank: int = 0

    @property
    def reads_data(self) -> bool:
        """Tensor rank 0 of the first and last stages read batches (Megatron broadcasts to the rest)."""
        return self.tp_rank == 0 and (self.first_stage or self.last_stage)

    @property
    def reports(self) -> bool:
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0

    @classmethod
    def from_parallel_state(cls, vp_stage: int | None = None) -> Topology:
        """Read megatron-core's parallel_state; builds the gloo channel group (collective: every rank calls it)."""
        from megatron.core import parallel_state as ps

        dist = torch.distributed
        ignore_virtual = vp_stage is None
        topo = cls(
            rank=dist.get_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_src=ps.get_tensor_model_parallel_src_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            first_stage=ps.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
            last_stage=ps.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
            dp_group=ps.get_data_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
            cp_group=ps.get_context_parallel_group(),
            tp_group=ps.get_tensor_model_parallel_group(),
        )
        # Who reads data and who reports, agreed by every rank; new_group is itself collective.
        roles: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(roles, (topo.rank, topo.reads_data, topo.reports))
        members = sorted(r for r, reads, _ in roles if reads)
        reporters = [r for r, _, rep in roles if rep]
        if len(reporters) != 1:
            raise RuntimeError(f"expected exactly one reporting rank, found {reporters}")
        topo.channel_src = reporters[0]
        topo.channel_group = dist.new_group(ranks=members, backend="gloo")
        return topo


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


@dataclass
class _Accumulator:
    """One step's statistics on the device, summed over its micro-batches (no collective)."""

    sums: list[Tensor] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)
    domains: list[Tensor] = field(default_factory=list)
    ids: list[Tensor] = field(default_factory=list)

    def add(self, sample_sum: Tensor, sample_tokens: Tensor, domain: Tensor, ids: Tensor) -> None:
        self.sums.append(sample_sum)
        self.tokens.append(sample_tokens)
        self.domains.append(domain)
        self.ids.append(ids)

    def finish(self, num_domains: int, topo: Topology) -> StepStats:
        """The step's statistics reduced over context (sum) and data-parallel (gather) ranks."""
        sums, tokens = torch.cat(self.sums), torch.cat(self.tokens)
        domain, ids = torch.cat(self.domains), torch.cat(self.ids)
        self.sums, self.tokens, self.domains, self.ids = [], [], [], []
        if topo.cp_size > 1:
            # Each context-parallel rank holds a slice of every sequence: sum the slices.
            both = torch.stack([sums, tokens])
            torch.distributed.all_reduce(both, group=topo.cp_group)
            sums, tokens = both[0], both[1]
        zeros = torch.zeros(num_domains, device=sums.device, dtype=torch.float32)
        stats = StepStats(
            loss=sums.sum() / tokens.sum().clamp(min=1),
            sample_loss=sums / tokens.clamp(min=1),
            sample_domain=domain.to(torch.int32),
            sample_id=ids,
            domain_loss_sum=zeros.clone().index_add_(0, domain, sums),
            domain_token_count=zeros.clone().index_add_(0, domain, tokens),
            domain_sample_count=torch.zeros(num_domains, device=sums.device, dtype=torch.int64).index_add_(
                0, domain, torch.ones_like(domain)
            ),
        )
        return reduce_step_stats(stats, topo.dp_group)


class LossReporter:
    """Per-step statistics on the last stage: accumulate, reduce once, report from one rank."""

    def __init__(
        self, num_domains: int, topo: Topology, attachment: Any = None, weighting: Any = None
    ) -> None:
        self.num_domains = num_domains
        self.topo = topo
        self.attachment = attachment if topo.reports else None
        self.weighting = weighting
        self.acc = _Accumulator()
        self.host = AsyncHostCopy()
        self.versions: dict[int, int] = {}
        self.reported: list[int] = []  # steps this rank reported (bounded: the last 1024)
        self.keep_records = False  # tests: keep every reported step's arrays in `recorded`
        self.recorded: list[dict[str, Any]] = []
        self.weights_seen: list[list[float]] = []

    def __call__(self, loss_func: Callable[[Tensor], Any], loss_mask: Tensor, meta: MicroBatchMeta | None):
        """The wrapped loss_func for one micro-batch (see the module docstring)."""

        def wrapped(output_tensor: Tensor):
            if meta is None or not meta.train:
                return loss_func(output_tensor)
            mbs = meta.dataset_id.numel()
            per_token = output_tensor.reshape(mbs, -1)
            mask = loss_mask.reshape(mbs, -1).to(per_token.dtype)
            device = per_token.device
            domain = meta.dataset_id.to(device)
            with torch.no_grad():
                sample_sum = (per_token.detach().float() * mask.float()).sum(dim=1)
                sample_tokens = mask.float().sum(dim=1)
            w = self._weights(meta, sample_sum, sample_tokens, domain)
            if w is not None:
                output_tensor = (per_token * w.to(per_token.dtype).reshape(mbs, 1)).reshape(
                    output_tensor.shape
                )
            result = loss_func(output_tensor)
            if self.topo.tp_rank == 0:
                self.acc.add(sample_sum, sample_tokens, domain, meta.sample_id.to(device))
                if meta.index == meta.num_microbatches - 1:
                    self._finish_step(meta)
            return result

        return wrapped

    def _weights(self, meta: MicroBatchMeta, sample_sum: Tensor, sample_tokens: Tensor, domain: Tensor):
        """Detached instance weights of the micro-batch, the same on every tensor-parallel rank."""
        if self.weighting is None or not self.weighting.enabled:
            return None
        topo = self.topo
        w = torch.empty(sample_sum.shape, dtype=torch.float32, device=sample_sum.device)
        if topo.tp_rank == 0:
            sums, tokens = sample_sum, sample_tokens
            if topo.cp_size > 1:
                both = torch.stack([sums, tokens])
                torch.distributed.all_reduce(both, group=topo.cp_group)
                sums, tokens = both[0], both[1]
            self.weighting.sync(meta.version)
            w = self.weighting.weights(meta.step, sums / tokens.clamp(min=1), domain).float()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size(topo.tp_group) > 1:
            torch.distributed.broadcast(w, src=topo.tp_src, group=topo.tp_group)
        if self.keep_records:
            self.weights_seen.append(w.tolist())
        return w

    def _finish_step(self, meta: MicroBatchMeta) -> None:
        stats = self.acc.finish(self.num_domains, self.topo)
        self.versions[meta.step] = meta.version
        self._emit(self.host.push(meta.step, stats))

    def _emit(self, host: HostStats | None) -> None:
        if host is None:
            return
        version = self.versions.pop(host.step)
        if not self.topo.reports:
            return
        self.reported = [*self.reported[-1023:], host.step]
        if self.keep_records:
            self.recorded.append(
                {
                    "step": host.step,
                    "version": version,
                    "loss": host.loss,
                    "sample_id": host.sample_id.tolist(),
                    "sample_loss": host.sample_loss.tolist(),
                    "domain_loss_sum": host.domain_loss_sum.tolist(),
                    "domain_token_count": host.domain_token_count.tolist(),
                }
            )
        if self.attachment is not None:
            host.report_to(self.attachment, version)

    def flush(self) -> None:
        """Report the last step still in the host copy (end of training)."""
        self._emit(self.host.flush())


def batch_meta(
    data_iterator: Any, topo: Topology | None = None, micro_batch_size: int | None = None
) -> MicroBatchMeta | None:
    """The micro-batch's meta on every tensor-parallel rank of the last stage (None elsewhere)."""
    if topo is None or micro_batch_size is None:
        if _PLUGIN is None:
            return None
        topo, micro_batch_size = _PLUGIN.topo, _PLUGIN.settings.micro_batch_size
    if not topo.last_stage:
        return None
    loader = getattr(data_iterator, "iterable", data_iterator)  # Megatron wraps it in RerunDataIterator
    packed = torch.zeros(5 + 2 * micro_batch_size, dtype=torch.int64)
    if topo.tp_rank == 0:
        meta = loader.last_meta
        if meta is None:
            raise RuntimeError("batch_meta before the data iterator gave a batch")
        packed = meta.pack()
    group_size = torch.distributed.get_world_size(topo.tp_group) if torch.distributed.is_initialized() else 1
    if group_size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        t = packed.to(device) if device is not None else packed
        torch.distributed.broadcast(t, src=topo.tp_src, group=topo.tp_group)
        packed = t
    return MicroBatchMeta.unpack(packed)


def load_loader_state(path: Path) -> dict[str, Any]:
    """A loader state saved through Megatron-LM's dataloader checkpoint hook."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("dataloader_state_dict", state)


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


def add_arguments(parser):
    """Megatron-LM `extra_args_provider`: the --mixer-* options."""
    g = parser.add_argument_group(title="mixer")
    g.add_argument("--mixer-spec", type=str, default=None, help="job spec (YAML/JSON): domains and strategy")
    g.add_argument("--mixer", type=str, default=None, help="host:port of the mixer service (none: static)")
    g.add_argument("--mixer-token", type=str, default=None, help="bearer token with the writer role")
    g.add_argument("--mixer-sync-interval", type=int, default=1, help="iterations between announcements")
    g.add_argument("--mixer-prefetch-factor", type=int, default=2, help="DataLoader prefetch per worker")
    return parser


def wrap_loss(loss_func, loss_mask, meta, reporter: LossReporter | None = None):
    """The user's loss_func with instance weights and statistics (LossReporter.__call__)."""
    reporter = reporter or (_PLUGIN.reporter if _PLUGIN is not None else None)
    return loss_func if reporter is None else reporter(loss_func, loss_mask, meta)


@dataclass
class _Plugin:
    settings: LMSettings
    topo: Topology
    reporter: LossReporter
    attachment: Any = None

    def close(self, timeout: float = 60.0) -> bool:
        """Report the last step and wait (up to timeout) until the service acknowledged everything."""
        self.reporter.flush()
        if self.attachment is None:
            return True
        attachment, self.attachment = self.attachment, None  # once: at the end of training or at exit
        delivered = attachment.close(timeout)
        if not delivered:
            log.warning("mixer: %d reports not acknowledged", attachment.pending)
        return delivered


_PLUGIN: _Plugin | None = None


def datasets_provider(config: Any, train_val_test_num_samples: Sequence[int], vp_stage: int | None = None):
    """Megatron-LM's train_valid_test_datasets_provider for `--dataloader-type external`."""
    from megatron.training import get_args

    global _PLUGIN
    if vp_stage not in (None, 0):
        raise ValueError(
            "mixer: virtual pipeline stages (--num-layers-per-virtual-pipeline-stage) are not supported yet"
        )
    args = get_args()
    settings = settings_from_args(args)
    train, valid, plugin = build(config, settings, vp_stage)
    _PLUGIN = plugin
    # pretrain() offers no end-of-training hook: the last step's report goes out at exit.
    atexit.register(plugin.close)
    if train is not None and getattr(args, "save", None) and not getattr(args, "dataloader_save", None):
        args.dataloader_save = args.save  # Megatron-LM then saves train.save_state() with each checkpoint
    return train, valid, None


def settings_from_args(args: Any) -> LMSettings:
    from mixer.spec import JobSpec

    if getattr(args, "rampup_batch_size", None):
        raise ValueError(
            "mixer: --rampup-batch-size is not supported (the mixture draws whole global batches)"
        )
    if getattr(args, "sft", False) or getattr(args, "dataloader_inter_document_masking", False):
        raise ValueError(
            "mixer: packed sequences (--sft, --dataloader-inter-document-masking) are not supported yet"
        )
    if getattr(args, "dataloader_type", "external") != "external":
        raise ValueError("mixer: run with --dataloader-type external (the mixture is the data iterator)")
    text = Path(args.mixer_spec).read_text()
    spec = JobSpec.from_yaml(text)
    return LMSettings(
        spec=spec,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        num_workers=args.num_workers,
        prefetch_factor=getattr(args, "mixer_prefetch_factor", 2),
        sync_interval=getattr(args, "mixer_sync_interval", 1),
        address=getattr(args, "mixer", None),
        token=getattr(args, "mixer_token", None),
        load=getattr(args, "load", None),
        iteration=int(getattr(args, "iteration", 0) or 0),
    )


def build(
    config: Any,
    settings: LMSettings,
    vp_stage: int | None = None,
    attachment: Any = None,
    validation: bool = True,
):
    """(train iterator, validation iterator, plug-in) for this rank; iterators are None where no data is read."""
    from mixer.megatron.instance import InstanceWeighting

    spec = settings.spec
    topo = Topology.from_parallel_state(vp_stage)
    if attachment is None and topo.reports and settings.address:
        from mixer.megatron.attach import ServiceAttachment

        attachment = ServiceAttachment(settings.address, spec.name, settings.source, token=settings.token)
    weighting = None
    if topo.last_stage and topo.tp_rank == 0 and spec.weighting.name != "none":
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        weighting = InstanceWeighting(spec, device=device, group=topo.dp_group)
    reporter = LossReporter(spec.num_domains, topo, attachment, weighting)
    plugin = _Plugin(settings, topo, reporter, attachment)
    prefixes = [d.prefix for d in spec.domains]
    train_sets = domain_datasets(config, prefixes, "train", topo.reads_data)
    valid_sets = domain_datasets(config, prefixes, "valid", topo.reads_data) if validation else None
    if not topo.reads_data:
        return None, None, plugin
    from mixer.engine import Engine

    v0 = Engine(spec).current  # the service's version 0, derived by the same pure code
    sampler = MixtureSampler(
        spec.num_domains,
        settings.global_batch_size,
        v0.weights,
        fingerprint=spec.fingerprint(),
        dp_rank=topo.dp_rank,
        dp_size=topo.dp_size,
        dataset_lengths=[len(d) for d in train_sets],
    )
    channel = AnnouncedVersions(
        attachment,
        spec.num_domains,
        interval=settings.sync_interval,
        group=topo.channel_group,
        src=topo.channel_src,
        is_src=topo.reports,
    )
    train = MixtureLoader(
        train_sets,
        sampler,
        micro_batch_size=settings.micro_batch_size,
        channel=channel,
        weighting=weighting,
        num_workers=settings.num_workers,
        prefetch_factor=settings.prefetch_factor,
    )
    if settings.iteration > 0:
        train.load_state(_saved_state(settings, topo))
    if valid_sets is None:
        return train, None, plugin
    balanced = MixtureSampler(
        spec.num_domains,
        settings.global_batch_size,
        [1.0] * spec.num_domains,
        fingerprint="validation",
        dp_rank=topo.dp_rank,
        dp_size=topo.dp_size,
        dataset_lengths=[len(d) for d in valid_sets],
    )
    valid = MixtureLoader(
        valid_sets, balanced, micro_batch_size=settings.micro_batch_size, num_workers=0, train=False
    )
    return train, valid, plugin


def _saved_state(settings: LMSettings, topo: Topology) -> dict[str, Any]:
    """The loader state Megatron-LM saved with the checkpoint of settings.iteration."""
    from megatron.training.checkpointing import get_checkpoint_name

    name = get_checkpoint_name(
        settings.load,
        settings.iteration,
        tensor_rank=0,
        pipeline_rank=0,
        basename=f"train_dataloader_dprank{topo.dp_rank:03d}.pt",
    )
    if not Path(name).is_file():
        raise FileNotFoundError(
            f"mixer: resuming at iteration {settings.iteration} needs the mixture state saved with that "
            f"checkpoint ({name}); it is written when --dataloader-save (default: --save) is set"
        )
    return load_loader_state(Path(name))
