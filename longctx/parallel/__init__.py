"""Everything that crosses devices.

  dims            ParallelDims -> one named DeviceMesh and the flattened sub-meshes the rest needs
  comm            the counted comm layer (the only mover of attention data)
  sequence/       sequence-parallel attention: layouts, block planner, schedules, registry, tree, dilated
  data_parallel   FSDP2 / DDP / HSDP over the mesh
  tensor          tensor parallelism (DTensor plans, sequence-parallel norms) and the vocab-parallel loss
  pipeline        pipeline stages and schedules (torch.distributed.pipelining)
  deepspeed_engine  DeepSpeed ZeRO 1-3 over the data x context group
  collectives     bytes of every torch collective, per process group (a TorchDispatchMode)
  timeouts        every process group gets the default group's collective timeout (parallel.timeout_s)
"""

from .comm import Comm, CommStats
from .dims import DIM_NAMES, ParallelDims, ParallelMesh
from .sequence import *  # noqa: F403 - the sequence-parallel API is the package's public API
from .sequence import __all__ as _sequence_all

__all__ = ["Comm", "CommStats", "DIM_NAMES", "ParallelDims", "ParallelMesh", *_sequence_all]
