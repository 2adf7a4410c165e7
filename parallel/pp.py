"""Pipeline parallelism with torch.distributed.pipelining: one `CausalLMStage` per pp rank.

Position ids, document ids and labels travel down the pipeline next to the hidden states (integer
tensors, so they carry no gradient), which lets every stage build its own CP context and lets the last
stage compute the chunked loss *inside* its forward - where FSDP has its LM head gathered - instead of in
a separate loss function. The schedule's `loss_fn` therefore just passes that loss through.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class

SCHEDULES = ("1F1B", "GPipe")


def _loss_is_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output


class Pipeline:
    """Runs one optimizer step's micro-batches through the stages; returns the last stage's losses."""

    def __init__(
        self,
        stage_module: torch.nn.Module,
        pp_mesh: DeviceMesh,
        device: torch.device,
        n_microbatches: int,
        schedule: str,
        microbatch_shape: tuple[int, int],
        hidden_size: int,
        dtype: torch.dtype,
        hidden_seq: int | None = None,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"parallel.pp_schedule: unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}"
            )
        self.pp_rank, self.pp_size = pp_mesh.get_local_rank(), pp_mesh.size()
        self.is_first, self.is_last = self.pp_rank == 0, self.pp_rank == self.pp_size - 1
        self.n_microbatches = n_microbatches
        # Explicit example shapes: runtime shape inference would run the loss on uninitialised labels.
        b, s = microbatch_shape
        ints = [torch.empty(b, s, dtype=torch.int64, device="meta") for _ in range(3)]
        # Between stages the hidden states may be shorter than the tokens (TP sequence parallel).
        hidden = torch.empty(b, hidden_seq or s, hidden_size, dtype=dtype, device="meta", requires_grad=True)
        first_in = torch.empty(b, s, dtype=torch.int64, device="meta")
        inputs = ((first_in if self.is_first else hidden), *ints)
        loss = torch.empty(1, dtype=torch.float32, device="meta", requires_grad=True)
        outputs = loss if self.is_last else (hidden, *ints)
        self.stage = PipelineStage(
            stage_module,
            self.pp_rank,
            self.pp_size,
            device,
            input_args=inputs,
            output_args=outputs,
            group=pp_mesh.get_group(),
        )
        # scale_grads=False: the loss is already normalised by the global token count (trainer/loss.py).
        self.schedule = get_schedule_class(schedule)(
            self.stage, n_microbatches=n_microbatches, loss_fn=_loss_is_output, scale_grads=False
        )

    def step(self, input_ids, position_ids, doc_ids, labels) -> list[torch.Tensor]:
        """Forward + backward of all micro-batches (tensors [n_sequences, S_local]). Losses on the last stage."""
        losses: list[torch.Tensor] = []
        if self.is_first:
            self.schedule.step(
                input_ids,
                position_ids,
                doc_ids,
                labels,
                target=labels if self.is_last else None,
                losses=losses,
            )
        elif self.is_last:
            self.schedule.step(target=labels, losses=losses)
        else:
            self.schedule.step()
        return losses
