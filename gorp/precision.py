"""Training precision: fp32, or bf16 compute over fp32 master weights.

``training.precision: fp32 | bf16``. ``Precision`` gives the three things a training stage needs:

* ``mp_policy()``: the FSDP2 ``MixedPrecisionPolicy`` for :func:`gorp.fsdp.shard_model`. With bf16 the sharded
  parameters stay float32 (they *are* the master weights the optimizer updates); FSDP2 all-gathers them cast to bf16
  for the forward and backward, and reduce-scatters the gradients in float32, so every rank's gradient shard and every
  optimizer input is float32.
* ``autocast(device_type)``: the context for one worker (or workers without FSDP): float32 parameters, matmuls in bf16
  under ``torch.autocast``; gradients land in float32 on the float32 parameters.
* ``save_dtype``: the dtype of a stage's model folder (float32 by default: the master weights, so that the next stage
  or a resumed one starts from exactly what this stage trained; a bf16 folder would round full-rank updates of size
  ~lr * steps away at every stage boundary).

Where the casts happen (nothing else in gorp needs to know the precision): parameters are float32 in both paths, so
:class:`gorp.optim.ProjAdamW` sees float32 weights and gradients; it also casts every gradient to float32 before use
(``grad.to(torch.float32)``; the projector casts to the float32 projection in ``project``) and keeps the projection,
the task-memory bases (``set_basis``: ``.to(float32)``) and Adam's moments (``zeros_like`` of the float32 projected or
cast gradient) in float32 whatever the parameter dtype; the SVD/eigh runs in float64 (:mod:`gorp.projector`,
:mod:`gorp.memory`). The loss is computed in float32 (Hugging Face's causal-LM loss upcasts the logits).

fp16 is not offered: it needs dynamic loss scaling (a ``GradScaler``, and FSDP2's sharded variant) that this code does
not implement; bf16 has fp32's exponent range and needs none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16")
_COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """What ``training.precision`` means for one stage (see the module docstring)."""

    name: str = "fp32"
    save_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            extra = " (fp16 needs loss scaling, which gorp does not implement: use bf16)" if self.name == "fp16" else ""
            raise ValueError(f"unknown precision {self.name!r}; expected one of {PRECISIONS}{extra}")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls and activations run in."""
        return _COMPUTE[self.name]

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype of the parameters the optimizer updates (load the model in this dtype): always float32."""
        return torch.float32

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != self.master_dtype

    def mp_policy(self):
        """The FSDP2 ``MixedPrecisionPolicy`` for ``fully_shard``, or None for fp32 (FSDP2's default: no casts)."""
        if not self.mixed:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)

    def autocast(self, device_type: str = "cpu"):
        """The forward's context on an unsharded model: ``torch.autocast`` to bf16, or nothing for fp32.

        Under FSDP2 with ``mp_policy()`` the parameters are already bf16 in the forward; autocast is then not needed
        (and harmless). Wrap the forward and the loss only; ``backward()`` may run outside it.
        """
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)


def get_precision(name: str | None) -> Precision:
    """``Precision`` from the stream's ``training.precision`` (None: fp32)."""
    return Precision(name or "fp32")
