"""Distributed set-up read from torchrun's or SLURM's environment; rank 0 alone logs and saves.

Launch: `torchrun --nproc_per_node=N -m captioning.train trainer=ddp` (see conf/trainer/ddp.yaml). Every
helper here is a no-op returning the single-process answer when the world has one process, so the
training loop calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A gloo group over the same processes for small host-side exchanges (e.g. the preemption flag):
    # under NCCL it avoids a GPU round trip and a host sync at every step. None: use the default group.
    cpu_group: object = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistInfo()  # the default of the functions that take a DistInfo: one process, no group


def read_env() -> DistInfo:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or an srun step's SLURM_* (runtime.cluster.detect_world); an sbatch
    shell of several tasks without srun is an error naming the fix, not a hang."""
    from captioning.runtime.cluster import detect_world

    world = detect_world()
    if world.world_size > 1 and world.source == "srun":
        os.environ.setdefault("MASTER_ADDR", world.master_addr)
        os.environ.setdefault("MASTER_PORT", str(world.master_port))
    return DistInfo(world.rank, world.world_size, world.local_rank)


def pick_device(name: str, info: DistInfo = SINGLE_PROCESS, key: str = "device") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> the device; `cuda` (and `auto` on a GPU node) is this rank's GPU.
    Any other value, or CUDA asked for where there is none, is a ValueError naming `key` (the config key)."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"{key}={name}: must be auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key}={name} asks for CUDA but no CUDA device is available here ({key}=cpu or auto)")
    if name == "cuda":
        return torch.device("cuda", info.local_rank)
    if name.startswith("cuda:") and info.enabled:
        raise ValueError(
            f"trainer.device={name} would put every process on one GPU; under torchrun use "
            "trainer.device=cuda or auto (rank r uses cuda:LOCAL_RANK)"
        )
    return torch.device(name)


def backend_for(device: str) -> str:
    """NCCL when the run trains on CUDA, gloo otherwise: `trainer.device=cpu` on a GPU node must not get NCCL,
    which cannot reduce CPU tensors."""
    if device == "cpu":
        return "gloo"
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "nccl"
    return "gloo"


def init_distributed(backend: str | None = None, device: str = "auto", timeout_minutes: float = 60) -> DistInfo:
    """Join the process group when the environment describes more than one process; `device` is the
    `trainer.device` value and picks the backend unless `backend` is given. `timeout_minutes` bounds every
    collective (the other ranks wait that long while rank 0 scores a validation alone)."""
    import datetime

    info = read_env()
    if info.enabled and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = backend or backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        # rank and world size passed explicitly: under srun they are not in RANK/WORLD_SIZE.
        dist.init_process_group(
            backend=backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        if backend != "gloo":
            info.cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return info


def all_reduce_mean(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """The mean over ranks of each value (every rank gets the same dict)."""
    if not info.enabled:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: v / info.world_size for k, v in zip(keys, tensor.tolist())}


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank, so that all ranks take the same branch (a rank that
    leaves the loop alone would leave the others waiting in the next gradient all-reduce)."""
    if not info.enabled:
        return bool(flag)
    tensor = torch.tensor([int(bool(flag))], dtype=torch.int32)  # CPU: gloo default group or info.cpu_group
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return bool(tensor.item())


def any_rank_flags(flags: tuple[bool, ...], info: DistInfo) -> tuple[bool, ...]:
    """`any_rank` for several flags in one exchange."""
    if not info.enabled:
        return tuple(bool(f) for f in flags)
    tensor = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return tuple(bool(v) for v in tensor.tolist())


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank `src`'s (picklable) object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, group=info.cpu_group)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) into every rank's module.

    DDP broadcasts buffers at the start of each training forward, but the forward then updates them from
    each rank's own batch, so after the last step the ranks' running statistics differ. Call this before
    evaluating in eval mode, so that all ranks decode with the statistics rank 0 saves in its checkpoint.
    """
    if not info.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (end of train()); without it the process may hang or warn at exit."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
