"""lipdeq: deep equilibrium models with guaranteed and certified fixed-point convergence."""

from lipdeq.gradients import fixed_point
from lipdeq.solvers import Solution, Status, solve

__version__ = "0.1.0"
__all__ = ["fixed_point", "solve", "Solution", "Status", "__version__"]
