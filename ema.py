"""EMA of the student LoRA, kept as Flow-GRPO and Flow-OPD keep it: evaluated and exported, never rolled out.

    decay_t = min((1 + t) / (10 + t), 0.9)                          t = optimizer steps taken so far
    ema    <- decay_t^G * ema + (1 - decay_t^G) * theta_t            after optimizer step t when (t + 1) % 8 == 0

What a "step" is. Flow-GRPO's training script (scripts/train_sd3.py, flow_grpo/ema.py) calls
`ema.step(params, global_step)` once per micro-batch, after that micro-batch's trained timesteps, and
`global_step` counts optimizer steps: it advances when accelerate syncs the gradients, once every
gradient-accumulation group of micro-batches, just before that group's last call. Both the decay and the
"every 8" test read this counter, so
  - t counts optimizer steps, and the EMA moves after optimizer steps t = 7, 15, 23, ... (decay 8/17, 16/25,
    24/33, ..., capped at 0.9 from t = 80 on);
  - at such a t the update runs once per micro-batch call that sees t: the last micro-batch of step t and the
    first G - 1 of step t + 1, whose weights are still theta_t (the optimizer only steps at the sync). G pulls
    toward the same theta_t with the same decay are one pull with decay_t^G. G = micro-batches per optimizer
    step on each rank = images per rank per iteration / (--updates x --micro_batch): 1 in
    runs/sd35m_opd.sh (32 images per rank, 2 steps, micro-batch 16), 8 in Flow-GRPO's GenEval config on 8 GPUs.
We apply the G pulls at once, right after optimizer step t. With an even --updates (the recipe's 2) a
step t = 7 mod 8 is never the last of an iteration, so Flow-GRPO's trailing G - 1 calls land inside the same
iteration and the EMA is the same as theirs wherever it is read (evaluation, checkpoints).
The EMA starts as a copy of the student's starting weights (the merged init, or the fresh LoRA), in fp32.

Deviations: a step skipped by train.py's numerical guard (non-finite loss or gradient; Flow-GRPO has no
guard) does not advance t. The EMA is a second LoRA adapter, ADAPTER, on the shared base (all ranks hold
it, so evaluation can be sharded); the authors swap the EMA into the live parameters and back.

Demo: python -c "import ema; print([round(ema.decay(t), 3) for t in (7, 15, 23, 79, 80)])"
"""
from dataclasses import dataclass

import torch

from merge_lora import lora_from_adapter
from teachers import add_adapter

ADAPTER = "student_ema"     # adapter name of the EMA weights (the live ones are "student")
EVERY = 8                   # update after optimizer steps t with (t + 1) % EVERY == 0
CAP = 0.9                   # the decay's ceiling


def decay(t: int, cap: float = CAP) -> float:
    """decay_t = min((1 + t) / (10 + t), cap), t = optimizer steps taken."""
    return min((1 + t) / (10 + t), cap)


def due(t: int, every: int = EVERY) -> bool:
    """Whether the EMA moves after optimizer step t: (t + 1) % every == 0."""
    return (t + 1) % every == 0


@torch.no_grad()
def update(ema: list[torch.Tensor], live: list[torch.Tensor], decay_: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, in place, tensor by tensor (any shapes, ema in fp32)."""
    for e, p in zip(ema, live, strict=True):
        e.lerp_(p.to(e.dtype), 1.0 - decay_)                                   # ema + (1 - d)(theta - ema)


@dataclass
class EMA:
    """The EMA adapter's parameters and Flow-GRPO's step counter."""
    weights: list[torch.Tensor]         # ADAPTER's LoRA parameters (fp32), in the order of the live ones
    repeats: int                        # G: micro-batches per optimizer step on each rank
    step: int = 0                       # t: optimizer steps taken

    def after_optimizer_step(self, live: list[torch.Tensor]) -> None:
        """Call after each optimizer step taken, with the student's parameters."""
        self.step += 1
        if due(self.step):
            update(self.weights, live, decay(self.step) ** self.repeats)       # G pulls at decay_t = one at decay_t^G


def add_ema(transformer, repeats: int) -> EMA:
    """Add ADAPTER: a frozen fp32 copy of the "student" adapter as it is now; "student" stays the active one."""
    add_adapter(transformer, lora_from_adapter(transformer, "student"), ADAPTER, "EMA of the student")
    transformer.set_adapter("student")
    named = dict(transformer.named_parameters())
    live = [n for n in named if ".student." in n]
    weights = [named[n.replace(".student.", f".{ADAPTER}.")] for n in live]
    with torch.no_grad():
        for w, n in zip(weights, live):
            w.data = named[n].detach().float().clone()                   # exact: add_adapter rounds to the base dtype
            w.requires_grad_(False)
    return EMA(weights, repeats)


def names(transformer) -> list[str]:
    """Parameter names of ADAPTER, in the order of EMA.weights."""
    return [n.replace(".student.", f".{ADAPTER}.") for n, _ in transformer.named_parameters() if ".student." in n]
