"""Knowledge distillation losses, the teacher wrapper and feature taps."""

from kdq.distill.hooks import FeatureTaps
from kdq.distill.kd import KDLoss
from kdq.distill.teacher import TEACHER_MODES, Distiller, freeze

__all__ = ["KDLoss", "Distiller", "TEACHER_MODES", "FeatureTaps", "freeze"]
