"""Helpers for the bundles' ``multi_gpu_train.json`` (``torchrun`` + ``DistributedDataParallel``) and
``multi_gpu_inference.json`` (sharded inference; the writing is
:class:`medad_monai.engine.handlers.AnomalyWriterHandler`'s).

The configs follow the MONAI model-zoo pattern::

    torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run \
        --config_file "['bundles/morphaeus/configs/train.json','bundles/morphaeus/configs/multi_gpu_train.json']"

and run on GPUs (NCCL, one device per process) or, with the same file, on CPU processes (gloo), which is how the tests
exercise them. What the override changes in ``train.json``, and why (JSON has no comments):

- ``device``/``initialize``/``finalize``: :func:`local_device`, :func:`init_process_group`,
  :func:`destroy_process_group`.
- ``network``: ``DistributedDataParallel`` (``device_ids`` only on CUDA). MorphAEus adds
  ``find_unused_parameters=True``: its deformation branch gets no gradient during the warm-up epochs.
- samplers: training ``DistributedSampler(shuffle=True, even_divisible=True)``; validation
  ``even_divisible=False``, so no image is duplicated and the all-reduced batch-size-weighted ``val_loss`` equals the
  single-process value. ``batch_size`` is per process; MemMC-MAE's ``learning_rate`` follows MAE's linear rule with
  the effective batch ``batch_size * world_size``.
- nothing about the handlers: the logging handlers of ``train.json`` and ``inference.json`` (``StatsHandler``,
  ``TensorBoardStatsHandler``, ``ProgressBar``) gate themselves with ``"_disabled_": "@is_not_rank0"``, MONAI's own
  convention (its default MLflow tracking settings), so they are never built on rank > 0 (a
  ``TensorBoardStatsHandler`` creates its event file when built) and the override never refers to a handler by its
  position in a list. The saving handlers (:mod:`medad_monai.engine.checkpoints`) write on rank 0 by themselves.
- ``calibrate#network#model`` is the plain network: ``DistributedDataParallel`` does not expose the model's
  ``predict_anomaly``/``anomaly_map``, and calibration needs no gradient synchronisation.
- ``run`` waits at a barrier after training: rank 0 writes ``model.pt`` while the other ranks would otherwise already
  be loading it for the calibration pass (seen: a rank loaded the previous epoch's weights).

Example::

    >>> import torch
    >>> from medad_monai.engine.distributed import all_gather_uneven
    >>> all_gather_uneven(torch.arange(3.0))  # one process: returned unchanged
    tensor([0., 1., 2.])
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "local_device", "init_process_group", "destroy_process_group", "all_gather_uneven", "all_gather_objects",
    "is_distributed", "barrier", "unwrap_network",
]

_LAUNCH_HINT = (
    "multi_gpu_train.json is meant to be launched by torchrun, e.g. `torchrun --standalone --nnodes=1 "
    "--nproc_per_node=2 -m monai.bundle run --config_file \"['<bundle>/configs/train.json',"
    "'<bundle>/configs/multi_gpu_train.json']\"`"
)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"Environment variable {name} is not set: {_LAUNCH_HINT}.")
    return int(value)


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU (every process then uses the CPU with gloo).

    Raises:
        RuntimeError: when ``LOCAL_RANK`` is missing (not launched by ``torchrun``), or when this node has fewer GPUs
            than processes, naming both numbers.
    """
    local_rank = _env_int("LOCAL_RANK")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n_gpus = torch.cuda.device_count()
    if local_rank >= n_gpus:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this node has only {n_gpus} GPU(s): use --nproc_per_node={n_gpus} or fewer "
            "(one process per GPU; NCCL cannot share a GPU between processes)."
        )
    return torch.device(f"cuda:{local_rank}")


def init_process_group(backend: str | None = None) -> bool:
    """Joins the ``torchrun`` process group once: NCCL on GPUs, gloo on CPU (our choice: the CPU path is what lets
    the multi-process config be tested without GPUs). Also pins this process' CUDA device, which NCCL collectives
    (including ignite's metric all-reduce) use.

    Returns:
        whether this call created the group (``False`` if it already existed).
    """
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return False
    dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"))
    return True


def destroy_process_group() -> None:
    """Leaves the process group (for the bundle's ``finalize``); a no-op when there is none."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates, in rank order, tensors whose first dimension differs between ranks.

    ``torch.distributed.all_gather`` (and ``ignite.distributed.all_gather``) need equal shapes, but a validation
    ``DistributedSampler(even_divisible=False)`` gives shards of different lengths (7 images on 2 ranks: 4 and 3).
    Each rank's tensor is padded to the longest shard, gathered, and the padding removed, so every item is counted
    exactly once. Must be called by every rank (it is a collective), the same number of times.

    Args:
        tensor: ``(n_rank, ...)``; the trailing dimensions and dtype must agree between ranks.

    Returns:
        ``(sum of n_rank, ...)`` on every rank; the input itself when not running distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    # bool is not supported by every backend's all_gather (gloo); uint8 round-trips exactly
    is_bool = tensor.dtype == torch.bool
    # NCCL only moves CUDA tensors; gloo takes CPU ones (handlers keep their accumulators on the CPU)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = (tensor.to(torch.uint8) if is_bool else tensor).to(comm)
    world = dist.get_world_size()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_ = [int(s.item()) for s in sizes]
    longest = max(sizes_)
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad], dim=0)
    chunks = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(chunks, local.contiguous())
    out = torch.cat([c[:s] for c, s in zip(chunks, sizes_)], dim=0).to(tensor.device)
    return out.bool() if is_bool else out


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (any wrapper whose ``module`` attribute is an
    ``nn.Module``), else ``network`` itself. The one unwrap of the package: wrappers hide the model's own methods
    (``predict_anomaly``, ``anomaly_map``) and attributes (``smooth_sigma``).

    Example::

        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_network(torch.nn.DataParallel(net)) is net, unwrap_network(net) is net
        (True, True)
    """
    inner = getattr(network, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else network


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Waits for every process of the group (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
