"""The three-stage transfer pipeline (align, distill, long context) that trains a built hybrid.

Public API: ``run_transfer(config, out_dir, resume=False) -> TransferResult`` runs a whole run config
(``headscope transfer --config run.yaml --out RUN_DIR`` on the command line, or
``torchrun --nproc-per-node N -m headscope.transfer ...``); ``align_hybrid(student, teacher, batches,
steps, lr)`` is a short in-memory stage 1; ``load_config``/``config_from_dict`` validate run configs.
"""

from headscope.transfer.api import StageSummary, TransferResult, align_hybrid, build_student, run_transfer
from headscope.transfer.config import DataConfig, HybridSpec, StageConfig, TransferConfig, config_from_dict, load_config
from headscope.transfer.trainer import StepInfo, TrainingDiverged

__all__ = [
    "DataConfig", "HybridSpec", "StageConfig", "StageSummary", "StepInfo", "TrainingDiverged", "TransferConfig",
    "TransferResult", "align_hybrid", "build_student", "config_from_dict", "load_config", "run_transfer",
]
