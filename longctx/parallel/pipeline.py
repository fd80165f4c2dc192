"""Pipeline parallelism with `torch.distributed.pipelining`: the model cut into stages by layer, one
schedule from torch per config name.

  pp_schedule        torch schedule                   stages per rank   stage ids of pp rank r
  gpipe              ScheduleGPipe                    1                 r
  1f1b               Schedule1F1B                     1                 r
  interleaved_1f1b   ScheduleInterleaved1F1B          v (default 2)     r, r + pp, ...  (loop)
  looped_bfs         ScheduleLoopedBFS                v (default 2)     loop
  interleaved_zb     ScheduleInterleavedZeroBubble    v (default 2)     loop
  zbv                ScheduleZBVZeroBubble            2                 r, 2 pp - 1 - r  (V)
  dualpipev          ScheduleDualPipeV                2                 V

A stage is the Transformer itself with the layers it does not own removed (layers kept in a ModuleDict under
their global index, so parameter names equal the single-device model's), the embedding only on the first
stage and the final norm and output only on the last. Position ids are not sent between stages: the plan
sets them on every stage before a step (they are the same for every microbatch), and the last stage returns
its hidden states so the loss (chunked, or vocab-parallel under tp) runs in the schedule's loss_fn.
Schedules are built with scale_grads=False: the trainer normalises by the global count of real labels
(docs/algorithms.md §11), which already accounts for every microbatch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = {  # name -> (torch class, stage placement, stages per rank: None = configurable)
    "gpipe": ("ScheduleGPipe", "loop", 1),
    "1f1b": ("Schedule1F1B", "loop", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop", None),
    "looped_bfs": ("ScheduleLoopedBFS", "loop", None),
    "interleaved_zb": ("ScheduleInterleavedZeroBubble", "loop", None),
    "zbv": ("ScheduleZBVZeroBubble", "v", 2),
    "dualpipev": ("ScheduleDualPipeV", "v", 2),
}


# schedules that split each backward in two (inputs' gradients, then later the weights'): under FSDP2 with
# reshard_after_forward the weight half computes against parameters already resharded and the gradients
# come out wrong (grad norm 10% off on the tests' model), so they need the parameters kept gathered
SPLIT_BACKWARD = ("interleaved_zb", "zbv", "dualpipev")


def stages_per_rank(schedule: str, virtual: int) -> int:
    if schedule not in SCHEDULES:
        import difflib

        close = difflib.get_close_matches(str(schedule), SCHEDULES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"parallel.pp_schedule={schedule!r} is not a schedule{hint}; choose one of "
                         f"{', '.join(SCHEDULES)}")
    fixed = SCHEDULES[schedule][2]
    if fixed is not None:
        if virtual not in (0, fixed):
            raise ValueError(f"parallel.pp_schedule={schedule} runs {fixed} stage(s) per rank, got parallel.pp_virtual="
                             f"{virtual}; set parallel.pp_virtual=0 (auto) or {fixed}")
        return fixed
    return virtual or 2


def n_microbatches(pp: int, microbatches: int) -> int:
    """parallel.microbatches, where 0 means one per pipeline rank."""
    return microbatches or pp


def check_pipeline(*, pp: int, schedule: str, virtual: int, microbatches: int, n_layers: int, local_batch: int,
                   split=(), sharded: bool = False, reshard_after_forward: bool = True,
                   activation_checkpoint: str = "none") -> tuple[int, int]:
    """Every constraint of a pipeline config; returns (stages per rank, microbatches). Messages name the key.
    `sharded`: the stages are FSDP2 (or HSDP) modules."""
    per_rank = stages_per_rank(schedule, virtual)
    n_stages = pp * per_rank
    if n_stages > n_layers:
        raise ValueError(f"parallel.pp={pp} x {per_rank} stage(s) per rank = {n_stages} pipeline stages, but the model "
                         f"has only model.n_layers={n_layers}; every stage needs at least one layer: lower parallel.pp"
                         f" (or parallel.pp_virtual)")
    mb = n_microbatches(pp, microbatches)
    # the count as the user set it, or where it came from when left at 0
    said = f"parallel.microbatches={mb}" if microbatches else f"{mb} (parallel.microbatches=0: one per pipeline rank)"
    if local_batch % mb:
        raise ValueError(f"each data-parallel rank's micro-batch ({local_batch} sequences = train.batch_size / (dp x "
                         f"train.accumulation)) is not divisible by {said}; make "
                         f"train.batch_size a multiple of dp x train.accumulation x microbatches")
    if schedule != "gpipe" and mb < pp:
        raise ValueError(f"parallel.pp_schedule={schedule} needs at least as many microbatches as pipeline ranks: "
                         f"{said} < parallel.pp={pp}; raise parallel.microbatches to {pp} (and "
                         f"train.batch_size with it) or use pp_schedule=gpipe")
    if schedule in ("interleaved_1f1b", "interleaved_zb") and mb % max(1, mb // pp):
        raise ValueError(f"parallel.pp_schedule={schedule} needs parallel.microbatches to be a multiple of "
                         f"max(1, microbatches // pp) (torch's interleaving rounds); {mb} is not: use a multiple "
                         f"of parallel.pp={pp}")
    if schedule == "dualpipev" and mb < n_stages:
        raise ValueError(f"parallel.pp_schedule=dualpipev needs at least as many microbatches as stages ({n_stages}), "
                         f"got {said}; raise parallel.microbatches to {n_stages} (and train.batch_size with it)")
    if split:
        stage_layers(n_layers, n_stages, split)  # validates
    if schedule in SPLIT_BACKWARD and sharded and reshard_after_forward:
        raise ValueError(f"parallel.pp_schedule={schedule} splits each backward into its input and weight halves, "
                         "and under FSDP2 with parallel.reshard_after_forward=true the weight half runs after the "
                         "parameters are resharded (wrong gradients); set parallel.reshard_after_forward=false, or "
                         "use a schedule without split backward (1f1b, interleaved_1f1b, looped_bfs, gpipe)")
    if schedule in SPLIT_BACKWARD and activation_checkpoint != "none":
        # the weight half recomputes each checkpointed block a second time, re-entering the context torch's
        # composable checkpoint made for the first (AttributeError on every rank, at the first step)
        raise ValueError(f"parallel.activation_checkpoint={activation_checkpoint} with parallel.pp_schedule="
                         f"{schedule}: a split-backward schedule recomputes every checkpointed block twice (input "
                         "gradients, then weight gradients), which torch's activation checkpointing cannot; set "
                         "parallel.activation_checkpoint=none (train.mlp_chunks still saves the MLP's memory), or "
                         "use a schedule without split backward (1f1b, interleaved_1f1b, looped_bfs, gpipe)")
    return per_rank, mb


def stage_layers(n_layers: int, n_stages: int, split=()) -> list[range]:
    """Layers of each stage: `split` lists the first layer of stages 1.. (n_stages - 1 increasing indices);
    empty = as even as possible, earlier stages one layer more when it does not divide."""
    if split:
        split = list(split)
        if len(split) != n_stages - 1 or split != sorted(set(split)) or split[0] < 1 or split[-1] >= n_layers:
            raise ValueError(f"parallel.pp_split={split} must list {n_stages - 1} increasing layer indices in "
                             f"[1, {n_layers - 1}] (where stages 1.. begin)")
        bounds = [0, *split, n_layers]
    else:
        base, extra = divmod(n_layers, n_stages)
        bounds = [0]
        for s in range(n_stages):
            bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


def stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    if SCHEDULES[schedule][1] == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def split_model(model: nn.Module, layers: range, *, first: bool, last: bool) -> nn.Module:
    """A copy of `model` keeping only `layers` (and the embedding / head when first / last). A model that
    knows its own parts (a Hugging Face adapter) splits itself by `pipeline_stage`."""
    if hasattr(model, "pipeline_stage"):
        return model.pipeline_stage(layers, first=first, last=last)
    stage = copy.deepcopy(model)
    stage.layers = nn.ModuleDict({str(i): stage.layers[i] for i in layers})
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them."""

    stages: list[nn.Module]  # this rank's stage modules, in stage order
    stage_ids: list[int]
    n_stages: int
    schedule: object
    microbatches: int
    has_first: bool
    has_last: bool

    placement: str = "loop"  # "v": rank r holds stages r and 2 pp - 1 - r
    _forward_order: dict | None = None  # V placement: the forward-only action lists, lowered once

    def run(self, *args, backward: bool = True, **kwargs) -> None:
        """One step of the schedule (forward and backward), or with backward=False forward only (the loss
        still computed on the last stage). Torch's `eval` replays a V schedule's own action list, whose
        stage-to-stage hand-offs on one rank expect backward inputs, so for V placement the forward-only
        list is this pipeline's own: every stage's forwards in stage order (a valid order: each stage's
        input comes from an earlier stage, earlier in its rank's list), lowered with torch's send/recv pass."""
        sched = self.schedule
        if backward:
            return sched.step(*args, **kwargs)
        if self.placement != "v":
            return sched.eval(*args, **kwargs)
        train_order = sched.pipeline_order_with_comms
        if self._forward_order is None:
            self._forward_order = _forward_order(sched, self.microbatches)
        sched.pipeline_order_with_comms = self._forward_order
        try:
            return sched.eval(*args, **kwargs)
        finally:
            sched.pipeline_order_with_comms = train_order

    def set_positions(self, position_ids: torch.Tensor, documents=None) -> None:
        for m in self.stages:
            m._pp_position_ids = position_ids
            m._pp_documents = documents

    @property
    def last_stage(self) -> nn.Module:
        return self.stages[self.stage_ids.index(self.n_stages - 1)]


def _forward_order(schedule, microbatches: int) -> dict:
    """Per pp rank, a forward action for each of its stages and microbatches, stages in order, lowered as
    torch lowers a compute-only schedule (FSDP unshard/reshard, then the sends and receives between ranks).
    Torch's own loader (`_prepare_schedule_with_comms`) would refuse it: its check wants every microbatch's
    backward."""
    from torch.distributed.pipelining import schedules as torch_schedules

    action, forward = torch_schedules._Action, torch_schedules._ComputationType.FORWARD
    stage_rank = schedule.stage_index_to_group_rank
    by_rank: dict[int, list[int]] = {}
    for stage, rank in sorted(stage_rank.items()):
        by_rank.setdefault(rank, []).append(stage)
    order = {rank: torch_schedules._add_unshard_reshard([action(stage, forward, mb) for stage in stages
                                                         for mb in range(microbatches)])
             for rank, stages in by_rank.items()}
    return torch_schedules._add_send_recv(order, stage_to_rank=lambda s: stage_rank[s],
                                          num_stages=schedule._num_stages)


def _stage_hook(module, args, kwargs):
    """Hand every stage the step's position ids (and its microbatch's rows of the packed documents), and
    make the last stage return hidden states."""
    kwargs.setdefault("position_ids", module._pp_position_ids)
    docs = getattr(module, "_pp_documents", None)
    if docs is not None:
        if docs.batch > 1:  # the schedule cut the batch like torch.tensor_split; take this chunk's rows
            rows = torch.tensor_split(torch.arange(docs.batch), module._pp_microbatches)[module._pp_chunk]
            docs = docs.rows(int(rows[0]), int(rows[-1]) + 1)
        kwargs.setdefault("documents", docs)
    if module.output is not None:
        kwargs["return_hidden"] = True
    return args, kwargs


def build_pipeline(stage_modules: list[nn.Module], ids: list[int], n_stages: int, *, schedule: str,
                   microbatches: int, loss_fn, group, device) -> Pipeline:
    """PipelineStages over the pp group and the schedule; `loss_fn(hidden, labels)` runs on the last stage."""
    import torch.distributed.pipelining as pipelining

    class Stage(pipelining.PipelineStage):
        def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
            self.submod._pp_chunk = fwd_chunk_id  # which microbatch's documents the stage hook hands on
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    stages = []
    for module, idx in zip(stage_modules, ids):
        module._pp_position_ids, module._pp_documents, module._pp_chunk = None, None, 0
        module._pp_microbatches = microbatches
        module.register_forward_pre_hook(_stage_hook, with_kwargs=True, prepend=True)  # before the position check
        stages.append(Stage(module, idx, n_stages, device, group=group))
    cls = getattr(pipelining, SCHEDULES[schedule][0])
    if SCHEDULES[schedule][2] == 1:
        sched = cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        sched = cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(stage_modules, ids, n_stages, sched, microbatches, 0 in ids, n_stages - 1 in ids,
                    placement=SCHEDULES[schedule][1])
