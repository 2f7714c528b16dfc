"""How the calibration sweep runs, not what it computes: micro-batches, checkpointing, precision, processes.

Diff-Pruning's cost is forward + backward of the whole denoiser per kept timestep on the calibration
batch (importance.py). At full size (SD 1.5 / SDXL / SD3 at their native latent sizes) one batch of 32
does not fit a 24 GB GPU, and one process cannot use a second GPU. `SweepRuntime` bounds the memory
and spreads the work without changing the result:

- `micro_batch_size` M: the batch's loss L = mean over all N images is the sum over micro-batches of
  (n_i / N) * mean over micro-batch i, so backpropagating each weighted micro-batch loss as it is
  computed accumulates exactly dL/dtheta (up to float summation order), and peak activation memory
  scales with M instead of N.
- `gradient_checkpointing`: diffusers' `enable_gradient_checkpointing` during the sweep (activations
  recomputed in backward), switched off again afterwards so the pruning tracer sees every op.
- `precision="bf16"`: the forward runs under `torch.autocast(bfloat16)`; weights, gradients and their
  sum stay fp32. About halves the activations, but autocast keeps a bf16 copy of the weights for
  backward (+2 bytes per parameter), so it saves memory only from M >= 2 (benchmarks/full_size_sweep.py);
  its agreement with fp32 is measured, not assumed (benchmarks/sweep_precision.py).
- `workers`: under `accelerate launch` the micro-batches are dealt round-robin to the processes; each
  L_t is all-reduced before the threshold rule sees it (every process takes the same decision) and the
  gradient sums are all-reduced once, so every process ends with the one-process result.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from ..errors import DiffpruneError

PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class Workers:
    """The processes sharing one sweep (rank, world size); one process by default."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes, in place (no-op for one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def agree(self, failed: bool, device: torch.device) -> bool:
        """True on every process when any process failed (a collective: all must call it)."""
        if self.world == 1:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], device=device)
        return float(self.all_reduce(flag).item()) > 0


ONE_PROCESS = Workers()


@dataclasses.dataclass(frozen=True)
class SweepRuntime:
    """Memory and parallelism settings of a calibration sweep (see the module docstring)."""

    micro_batch_size: int | None = None  # None: the whole batch (or sampled pass) at once
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    workers: Workers = ONE_PROCESS

    def __post_init__(self):
        if self.micro_batch_size is not None and (isinstance(self.micro_batch_size, bool)
                                                  or not isinstance(self.micro_batch_size, int)
                                                  or self.micro_batch_size < 1):
            raise DiffpruneError(f"micro_batch_size={self.micro_batch_size!r} must be an integer >= 1 or None")
        if self.precision not in PRECISIONS:
            raise DiffpruneError(f"precision={self.precision!r} is not one of {PRECISIONS}")

    def chunks(self, n: int) -> list[slice]:
        """This process's micro-batches of n rows: slices of <= M rows, dealt round-robin to the processes."""
        size = n if self.micro_batch_size is None else self.micro_batch_size
        every = [slice(start, min(start + size, n)) for start in range(0, n, size)]
        return every[self.workers.rank::self.workers.world]

    def weighted_loss(self, n: int, chunk_loss: Callable[[slice], torch.Tensor], grad: bool,
                      device: torch.device) -> torch.Tensor:
        """The mean loss over n rows, from `chunk_loss(rows)` = the mean over those rows.

        With `grad`, each micro-batch's weighted loss is backpropagated as soon as it is computed
        (gradients accumulate in `.grad`; activations are freed per micro-batch), unless it is not
        finite. Returns the detached full-batch loss, summed over the processes.
        """
        total = torch.zeros((), device=device)
        for rows in self.chunks(n):
            with torch.set_grad_enabled(grad), self.autocast(device):
                loss = chunk_loss(rows).float()
                if rows.stop - rows.start != n:  # * 1.0 would be exact too; skipped to keep the graph as it was
                    loss = loss * ((rows.stop - rows.start) / n)
            if grad and bool(torch.isfinite(loss.detach())):  # a non-finite L_t is refused by the caller, on
                loss.backward()  # every process alike (the total is non-finite everywhere)
            total = total + loss.detach()
        return self.workers.all_reduce(total)

    def autocast(self, device: torch.device):
        """bf16 autocast for `precision="bf16"`, else nothing."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def reduce_grads(self, model: torch.nn.Module) -> None:
        """All-reduce every trainable parameter's `.grad` in place (a missing one counts as zeros)."""
        if self.workers.world == 1:
            return
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.workers.all_reduce(p.grad)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Gradient checkpointing on `model` for the sweep (if asked), off again afterwards."""
        if not self.gradient_checkpointing:
            yield
            return
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise DiffpruneError(f"gradient_checkpointing=True: {type(model).__name__} does not support "
                                 "gradient checkpointing; allowed: leave it off (use micro_batch_size to save memory)")
        was_on = bool(getattr(model, "is_gradient_checkpointing", False))
        model.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if not was_on:
                model.disable_gradient_checkpointing()

    def summary(self) -> dict:
        """What prune_report.json records about how the sweep ran."""
        return {"micro_batch_size": self.micro_batch_size, "gradient_checkpointing": self.gradient_checkpointing,
                "precision": self.precision, "num_processes": self.workers.world}


DEFAULT_RUNTIME = SweepRuntime()
