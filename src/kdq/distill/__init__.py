"""Knowledge distillation losses and the teacher wrapper."""

from kdq.distill.kd import KDLoss
from kdq.distill.teacher import TEACHER_MODES, Distiller, freeze

__all__ = ["KDLoss", "Distiller", "TEACHER_MODES", "freeze"]
