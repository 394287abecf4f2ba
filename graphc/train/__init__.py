"""Training: Caffe's solvers, the training loop, snapshots, and ``graphc train``/``test``."""
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver, SOLVER_TYPES, Solver, TrainingDiverged, get_solver)

__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
           "AdaDeltaSolver", "AdamSolver", "get_solver", "SOLVER_TYPES", "TrainingDiverged"]
