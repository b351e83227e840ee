"""The Megatron-LM plug-in: a `pretrain_gpt.py` run draws from live mixer weights and reports.

README ("Attaching Megatron-LM") shows the change to `pretrain_gpt.py`; it calls four things:

- `add_arguments(parser)`: the `--mixer-*` options (through `extra_args_provider`);
- `datasets_provider(config, train_val_test_num_samples, vp_stage)`: with
  `--dataloader-type external`, this rank's train and validation iterators over one `GPTDataset`
  per domain of the job spec, built from the user's own `GPTDatasetConfig` (tokenizer, sequence
  length, `--split`, seed, cache); None on ranks that read no data;
- `batch_meta(data_iterator)`: the micro-batch's domain ids, sample ids, step and
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

The pieces live in topology.py (a rank's groups), loader.py (MixtureLoader) and reporting.py
(LossReporter). Versions reach every loader rank through `announce.AnnouncedVersions` (no host barrier; applied
at one announced step on every rank and DataLoader worker). Checkpoints: Megatron-LM saves the
iterator's `save_state()` through its `--dataloader-save` hook (`maybe_save_dataloader_state`);
`datasets_provider` loads it back for `args.iteration`. The sampler draws the global batch, so a
resume with another data-parallel size continues the same global sample sequence.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixer.megatron.announce import AnnouncedVersions
from mixer.megatron.loader import MicroBatchMeta, MixtureLoader, domain_datasets
from mixer.megatron.reporting import LossReporter
from mixer.megatron.sampler import MixtureSampler
from mixer.megatron.topology import Topology

# The pieces the plug-in is made of live in topology.py, loader.py and reporting.py; they are
# named here too, so that a script needs one import.
__all__ = [
    "LMSettings",
    "LossReporter",
    "MicroBatchMeta",
    "MixtureLoader",
    "Topology",
    "add_arguments",
    "batch_meta",
    "build",
    "datasets_provider",
    "domain_datasets",
    "wrap_loss",
]

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        for option, value, lo, hi in (
            ("--mixer-sync-interval", self.sync_interval, 1, 1_000_000),
            ("--mixer-prefetch-factor", self.prefetch_factor, 1, 64),
            ("--num-workers", self.num_workers, 0, 1024),
            ("--micro-batch-size", self.micro_batch_size, 1, 1 << 31),
            ("--global-batch-size", self.global_batch_size, 1, 1 << 31),
        ):
            if not (isinstance(value, int) and lo <= value <= hi):
                raise ValueError(f"mixer: {option} must be an integer in [{lo}, {hi}], got {value!r}")


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
    from mixer.transfer import resolve_spec_text

    text = resolve_spec_text(Path(args.mixer_spec).read_text(), Path(args.mixer_spec).parent)
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

        _create_job(settings)
        attachment = ServiceAttachment(settings.address, spec.name, settings.source, token=settings.token)
    weighting = None
    if topo.last_stage:
        # Tensor-parallel rank 0 computes the weights and broadcasts them to the others
        # (LossReporter._weights), so every rank of the last stage takes part. Enabled by an
        # instance weighting method or by a strategy's per-domain loss weights (DoReMi, mode paper).
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        weighting = InstanceWeighting(spec, device=device, group=topo.dp_group)
        weighting = weighting if weighting.enabled else None
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


def _create_job(settings: LMSettings, timeout: float = 60.0) -> None:
    """Create the job on the service (idempotent: the same spec again is the same job); a clear error
    when the service cannot be reached or holds another spec under that name."""
    import grpc

    from mixer.client import MixerClient

    with MixerClient(settings.address, token=settings.token) as client:
        try:
            client.wait_ready(timeout)
            _, created = client.create_job(settings.spec)
        except grpc.FutureTimeoutError:
            raise RuntimeError(
                f"mixer: service at {settings.address} not reachable within {timeout:.0f}s "
                "(start it with `mixer serve`, or leave out --mixer to train on the spec's weights)"
            ) from None
        except grpc.RpcError as e:
            raise RuntimeError(f"mixer: creating job {settings.spec.name!r}: {e.details()}") from None
    log.info("mixer: job %s %s on %s", settings.spec.name, "created" if created else "exists", settings.address)


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
