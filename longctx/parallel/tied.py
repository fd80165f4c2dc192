"""A weight that the first and the last pipeline stage share: a language model's output head tied to its
embedding (tie_word_embeddings). A pipeline cannot hold one parameter in two stages, so each of the two
stages keeps its own copy, equal at the start. The tied weight's gradient is the sum of its two uses, so
before the optimizer step both copies get that sum (an all-reduce over the pair of pipeline ranks that hold
them, or an add where one rank holds both, as in a V schedule); equal copies with equal gradients take
equal AdamW steps and stay equal. The gradient norm counts the weight once (the head copy is left out).
Megatron keeps its tied embeddings the same way."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .tensor import local_tensor
from .timeouts import match_world_timeout


class TiedPipelineWeight:
    """The copies this rank holds (`embedding` in the first stage, `head` in the last; either may be None)
    by parameter name in their stage modules, looked up when used (data parallelism replaces parameters),
    and the process group of the pair of pipeline ranks holding them (None when one rank holds both)."""

    def __init__(self, first: nn.Module | None, last: nn.Module | None, names: tuple[str, str], group):
        self.first, self.last, self.group = first, last, group
        self.embedding_name, self.head_name = names

    @property
    def embedding(self) -> torch.nn.Parameter | None:
        """The first stage's copy, if this rank holds it."""
        return self.first.get_parameter(self.embedding_name) if self.first is not None else None

    @property
    def head(self) -> torch.nn.Parameter | None:
        """The last stage's copy on this rank: left out of the gradient norm (the embedding counts it)."""
        return self.last.get_parameter(self.head_name) if self.last is not None else None

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Give each copy the sum of both copies' gradients (collective over the pair; a no-op elsewhere)."""
        copies = [p for p in (self.embedding, self.head) if p is not None]
        if not copies:
            return
        for p in copies:  # a copy without a gradient took no part: it adds nothing, but still takes part
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                # a tensor-parallel embedding's gradient comes back replicated: its rows, as the head's are
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        pieces = [local_tensor(p.grad) for p in copies]
        if len(pieces) == 2:  # both stages on this rank
            if pieces[0].shape != pieces[1].shape:  # a bug: both are split by vocabulary rows, alike
                raise RuntimeError(f"the tied embedding and output head are split differently "
                                   f"({tuple(pieces[0].shape)} vs {tuple(pieces[1].shape)})")
            pieces[0].add_(pieces[1])
            pieces[1].copy_(pieces[0])
        elif self.group is not None:
            dist.all_reduce(pieces[0], group=self.group)


def tied_pipeline_weight(stages: list[nn.Module], stage_ids: list[int], n_stages: int, names: tuple[str, str],
                         world_mesh, owner_of_last: int) -> TiedPipelineWeight:
    """Build the pair's bookkeeping (collective: every rank calls it, in the same order). `world_mesh`: the
    DeviceMesh with "pp" as its first dimension; `owner_of_last`: the pipeline rank of the last stage."""
    first = stages[stage_ids.index(0)] if 0 in stage_ids else None
    last = stages[stage_ids.index(n_stages - 1)] if n_stages - 1 in stage_ids else None
    group = None
    if owner_of_last != 0:
        pp = world_mesh.mesh.shape[0]
        me = dist.get_rank()
        for ranks in world_mesh.mesh.reshape(pp, -1).t().tolist():  # each pipeline's ranks, in stage order
            pair = [ranks[0], ranks[owner_of_last]]
            made = dist.new_group(pair)  # every rank creates every pair's group: new_group is collective
            if me in pair:
                group = made
        match_world_timeout()  # these groups too wait parallel.timeout_s, not torch's default
    return TiedPipelineWeight(first, last, names, group)
