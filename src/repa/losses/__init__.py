"""REPA's training objective L = L_velocity + lambda L_REPA (REPA Sec. 3.3): denoising + alignment terms, and the
REPA family's terms as options (off = plain REPA, bit for bit): iREPA's spatial normalisation of the targets, HASTE's
alignment schedule and attention alignment, REG's class-token denoising, SRA's self-alignment."""

from repa.losses.family import (
    ScheduleKind,
    SelfAlignKind,
    align_weight,
    attention_alignment_per_sample,
    resample_attention,
    self_alignment_per_sample,
    teacher_time,
)
from repa.losses.repa_loss import HASTE_ATTN_PAIRS, RepaLoss
from repa.losses.terms import (
    AlignKind,
    alignment_loss,
    alignment_per_sample,
    denoising_loss,
    resample_tokens,
    spatial_norm,
)

__all__ = [
    "HASTE_ATTN_PAIRS",
    "AlignKind",
    "RepaLoss",
    "ScheduleKind",
    "SelfAlignKind",
    "align_weight",
    "alignment_loss",
    "alignment_per_sample",
    "attention_alignment_per_sample",
    "denoising_loss",
    "resample_attention",
    "resample_tokens",
    "self_alignment_per_sample",
    "spatial_norm",
    "teacher_time",
]
