"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the DiT, driven by Lightning's
ModelParallelStrategy (which works on the CPU with gloo as well as on GPUs).

Modes (strategy group): `fsdp_full` = FULL_SHARD (parameters resharded after forward),
`fsdp_grad_op` = SHARD_GRAD_OP (parameters kept gathered between forward and backward),
`fsdp_hybrid` = shard within a node, replicate across nodes (a 2-D device mesh). Every DiT block
is its own FSDP unit (the blocks the reference auto-wraps), then the root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}


def _discard(folder: Path) -> None:
    """Delete a folder so that a kill half-way never leaves a half-deleted folder under its
    name: rename it first (atomic), then delete."""
    trash = folder.with_name(folder.name + ".trash")
    if trash.exists():
        shutil.rmtree(trash)
    folder.rename(trash)
    shutil.rmtree(trash)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose sharded checkpoint folders are replaced atomically.

    Lightning writes a sharded checkpoint into the existing folder in place, so a kill while
    saving would mix two steps. Here every rank writes into ``<name>.partial``; then rank 0
    moves the old folder to ``<name>.old``, the new one into place and deletes the old one.
    A kill at any point leaves a complete checkpoint at ``<name>`` or ``<name>.old``
    (``ckpt_path=last`` falls back to the latter, see ``src.train.resolve_ckpt_path``).
    """

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
        if self.global_rank == 0:
            for stale in path.parent.glob("*.partial"):  # left by a kill during earlier saves
                _discard(stale)
        self.barrier("atomic_save_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("atomic_save_written")
        if self.global_rank == 0:
            if path.is_dir():  # (a run resumed from <name>.old has no <name>: keep .old)
                if old.exists():
                    _discard(old)
                path.rename(old)
            elif path.exists():
                path.unlink()
            partial.rename(path)
            if old.exists():
                _discard(old)
        self.barrier("atomic_save_done")


def fsdp2_strategy(devices: int, num_nodes: int = 1, **kwargs) -> ModelParallelStrategy:
    """Pure data parallelism over devices x nodes (no tensor parallelism)."""
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(
            f"trainer.devices={devices!r} must be an integer for the fsdp strategies (the "
            "device mesh is built from it); fix: e.g. trainer.devices=8"
        )
    return AtomicModelParallelStrategy(
        data_parallel_size=devices * num_nodes, tensor_parallel_size=1, **kwargs
    )


def apply_fsdp2(
    net: nn.Module,
    device_mesh,
    reshard_after_forward: bool = True,
    hybrid: bool = False,
    param_dtype: str | None = None,
) -> nn.Module:
    """Shard every block of `net` (its `block_classes`), then the root, over the mesh's
    data-parallel dimension (or a (nodes, devices-per-node) mesh for hybrid sharding)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"]
    if hybrid:
        world = mesh.size()
        per_node = torch.cuda.device_count() if torch.cuda.is_available() else world
        per_node = min(per_node, world)
        mesh = init_device_mesh(
            mesh.device_type,
            (world // per_node, per_node),
            mesh_dim_names=("replicate", "shard"),
        )
    mp = None
    if DTYPES[param_dtype] is not None:
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp is not None:
        kw["mp_policy"] = mp
    for module in net.modules():
        if isinstance(module, tuple(net.block_classes)):
            fully_shard(module, **kw)
    fully_shard(net, **kw)
    # the DiT is called through methods other than forward: they must gather the root too
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in getattr(net, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(net, name)
    return net


def fsdp1_strategy(sharding_strategy: str = "SHARD_GRAD_OP", state_dict_type: str = "sharded"):
    """Lightning's FSDPStrategy (FSDP1) for older clusters: every DiT block is a wrap unit.
    CUDA only (it refuses the CPU); gradient checkpointing stays the DiT's own ratio knob."""
    from lightning.pytorch.strategies import FSDPStrategy

    from src.models.dit import PyramidDiT

    return FSDPStrategy(
        auto_wrap_policy=set(PyramidDiT.block_classes),
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
    )
