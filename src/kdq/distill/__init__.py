"""Knowledge distillation: the methods (one registry, LOSSES), the objectives and feature taps.

One file per family of methods: response.py (KD, DKD, DIST), feature.py (FitNets hints,
attention transfer), relation.py (SP, RKD, PKT), contrastive.py (CRD). Each registers its
methods in LOSSES on import; `kdq methods` lists them. The objectives: objective.py (a frozen
teacher or an ensemble scored with any weighted mix of methods, with hidden labels for
unlabeled data), online.py (deep mutual learning), self.py (Be Your Own Teacher).
"""

from kdq.distill.methods import FAMILIES, LOSSES, READS, DistillLoss, register
from kdq.distill import contrastive, feature, relation, response  # noqa: F401, E402 - each registers its methods
from kdq.distill.response import KDLoss
from kdq.distill.hooks import FeatureTaps
from kdq.distill.online import MutualLearning, mutual_terms
from kdq.distill.objective import (
    Distiller,
    ce_weight,
    labeled_mask,
    method_losses,
    method_record,
    method_spec,
    parse_features,
)
from kdq.distill.teacher import TEACHER_MODES, Ensemble, ensemble_weights, freeze, unwrap

__all__ = ["LOSSES", "FAMILIES", "READS", "DistillLoss", "register", "KDLoss", "Distiller", "TEACHER_MODES",
           "method_losses", "method_record", "method_spec", "parse_features", "unwrap", "Ensemble", "ensemble_weights",
           "ce_weight", "labeled_mask", "FeatureTaps", "freeze", "MutualLearning", "mutual_terms"]
