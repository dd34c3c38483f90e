"""This process's share of each optimizer step's micro-batches, from a map-style dataset or a stream.

    LLMKIT_TRACE_SAMPLES=/tmp/trace llmkit pretrain pretrain/tiny   # records which samples each process saw

Micro-batch j of a step goes to process j % world_size, so the split is the same for any
interruption point; resume recomputes the epoch's batch order and skips what was consumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmkit.data.batches import Position, TrainData, shuffled_batch_order
from llmkit.errors import DataError


class MicroBatches:
    """This process's micro-batches, optimizer step by optimizer step, from a map-style dataset or a stream.

    Map-style: the epoch's batch order is recomputed from (seed, epoch), so starting at step k is
    skipping k steps' worth of micro-batches; nothing else is stored. Stream: the stream restarts
    from the position saved after the last completed step.
    """

    def __init__(self, data: TrainData, cfg, rank: int, world: int, device, start_step: int, stream_position: Position | None):
        self.data, self.cfg, self.rank, self.world, self.device = data, cfg, rank, world, device
        self.per_step = cfg.grad_accum_steps * world  # global micro-batches per optimizer step
        trace_dir = os.environ.get("LLMKIT_TRACE_SAMPLES")
        self.trace = Path(trace_dir) / f"samples-rank{rank}.jsonl" if trace_dir else None
        if data.stream is not None:
            self._iter = self._from_stream(stream_position)
            return
        if data.train is None:
            raise TypeError("TrainData needs train or stream")
        self.order = data.batch_order or shuffled_batch_order(len(data.train))
        first = self.order(cfg.seed, 0, cfg.micro_batch_size)
        self.steps_per_epoch = len(first) // self.per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.train: {len(data.train)} examples make {len(first)} micro-batches of {cfg.micro_batch_size}, fewer than one "
                f"optimizer step needs ({self.per_step} = grad_accum_steps x processes); add data or lower train.micro_batch_size"
            )
        self._iter = self._from_dataset(start_step)

    def _loader(self, dataset, batches):
        import torch
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset,
            batch_sampler=batches,
            # Its own generator: a DataLoader iterator otherwise draws its base seed from the global
            # RNG, which resume restores for dropout, so a resumed run would drift from an
            # uninterrupted one at every new iterator.
            generator=torch.Generator().manual_seed(self.cfg.seed),
            collate_fn=self.data.collate_fn,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _from_dataset(self, start_step: int):
        epoch, skip_steps = divmod(start_step, self.steps_per_epoch)
        while True:
            order = self.order(self.cfg.seed, epoch, self.cfg.micro_batch_size)
            used = self.steps_per_epoch * self.per_step
            if len(order) < used:
                raise DataError(f"batch order of epoch {epoch} has {len(order)} micro-batches, fewer than epoch 0's")
            # Global micro-batch j goes to process j % world: the same split for any interruption point.
            mine = order[self.rank : used : self.world][skip_steps * self.cfg.grad_accum_steps :]
            skip_steps = 0
            step_batches: list = []
            for k, batch in enumerate(self._loader(self.data.train, mine)):
                step_batches.append(batch)
                if len(step_batches) == self.cfg.grad_accum_steps:
                    ids = [i for b in mine[k + 1 - len(step_batches) : k + 1] for i in b]
                    yield step_batches, {"epoch": epoch, "ids": ids}
                    step_batches = []
            epoch += 1

    def _from_stream(self, position: Position | None):
        size = self.cfg.micro_batch_size
        examples: list = []
        for example, after in self.data.stream(position):
            examples.append(example)
            if len(examples) == size * self.per_step:
                # Global micro-batch j of this step is examples[j*size:(j+1)*size]; this process takes j % world == rank.
                mine = [examples[j * size : (j + 1) * size] for j in range(self.rank, self.per_step, self.world)]
                yield [self.data.collate_fn(m) for m in mine], after
                examples = []

    def next_step(self) -> tuple[list[dict[str, Any]], Position]:
        """The grad_accum_steps micro-batches of the next optimizer step, and the data position after it."""
        batches, position = next(self._iter)
        if self.trace is not None:
            # LLMKIT_TRACE_SAMPLES=DIR records which examples each process trained on (a debugging aid,
            # and how the tests check that resume neither repeats nor skips a sample).
            with open(self.trace, "a", encoding="utf-8") as f:
                f.write(json.dumps(position) + "\n")
        return batches, position


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """Move a batch's tensors to `device`."""
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}
