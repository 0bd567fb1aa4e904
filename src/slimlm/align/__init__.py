"""Instruction tuning of a (pruned, distilled) student: SFT on chat data, then optionally DPO.

`align(model, sft, out, prefs=None, ...)` is the API the CLI (`slimlm align`) calls; it runs on
TRL's `SFTTrainer` and `DPOTrainer`.
"""

from __future__ import annotations

__all__ = ["align", "AlignResult", "sft_loss_mask"]


def __getattr__(name):
    # Lazy: `slimlm --help` imports slimlm.align.cli, which must not pull in torch or TRL.
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
