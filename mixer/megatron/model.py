"""A tiny megatron-core GPTModel that trains on the CPU (and, separately, on one GPU in bf16)."""

from __future__ import annotations

import os
import socket

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from mixer.config import check
from mixer.megatron.config import ModelConfig

__all__ = [
    "ModelConfig",
    "SDPAttention",
    "build_gpt",
    "build_model",
    "init_distributed",
    "teardown",
    "unwrap",
]

# True when init_distributed created the process group, so teardown only destroys what it made.
_OWNS_PROCESS_GROUP = False


class SDPAttention(MegatronModule):
    """Causal core attention through torch's scaled_dot_product_attention (CPU and GPU)."""

    # Megatron's local DotProductAttention asks parallel_state's global memory buffer for a CUDA
    # tensor, which fails on the CPU; this takes the same constructor and forward arguments (the
    # CoreAttention protocol of megatron-core 0.16) and needs no buffers.

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_: object,
    ) -> None:
        super().__init__(config=config)
        if config.tensor_model_parallel_size != 1 or config.context_parallel_size != 1:
            raise ValueError("SDPAttention supports tensor and context parallel size 1 only")
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or config.num_attention_heads
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        """Attend causally; inputs [s, b, heads, dim], output [s, b, heads * dim]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention does not take packed sequences or attention bias")
        # The model is causal by construction (causal layer spec), so the dense mask is not needed.
        if self.num_heads != self.num_groups:
            repeat = self.num_heads // self.num_groups
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=True,
            scale=self.softmax_scale,
        )
        seq, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.num_heads * self.head_dim)


def _free_port() -> int:
    """Ask the OS for a free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device: str = "cpu") -> None:
    """Start a one-process group unless a launcher (torchrun) already started one."""
    global _OWNS_PROCESS_GROUP
    if torch.distributed.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # Launched by torchrun: the environment names the rendezvous, we only pick the backend.
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    else:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1, init_method="env://")
    _OWNS_PROCESS_GROUP = True


def _transformer_config(cfg: ModelConfig, device: str) -> TransformerConfig:
    """Megatron's config for the tiny model; only the dtype differs between CPU and GPU."""
    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        # Megatron initialises on the GPU by default; the CPU path must ask for CPU init.
        use_cpu_initialization=not on_gpu,
        bf16=on_gpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def build_model(cfg: ModelConfig, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """Initialise model parallel state (TP=PP=1) and return a GPTModel on the device."""
    check(cfg)
    if device.startswith("cuda"):
        # Pick the GPU before any NCCL group exists; torchrun sets LOCAL_RANK per process.
        index = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
    init_distributed(device)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    # Parameter init draws from torch's global RNG on the CPU path, so seed it for reproducibility.
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        # Megatron forks a CUDA RNG around dropout; the inference tracker makes that fork a no-op.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return build_gpt(cfg, device)


def build_gpt(cfg: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    """One more GPTModel (e.g. a frozen reference) once build_model has set up the parallel state."""
    check(cfg)
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    config = _transformer_config(cfg, device)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=False,
    )
    model.to(device)
    if not device.startswith("cuda"):
        return model
    from megatron.core.transformer.module import Float16Module

    # GPU path (bf16; not exercised on CPU CI): a bare bf16 GPTModel fails with a dtype
    # mismatch, Float16Module casts inputs and outputs.
    return Float16Module(config, model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a Float16Module (or the model itself)."""
    from megatron.core.transformer.module import Float16Module

    return model.module if isinstance(model, Float16Module) else model


def teardown() -> None:
    """Destroy model parallel state and the process group we created, so build_model can run again."""
    global _OWNS_PROCESS_GROUP
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
