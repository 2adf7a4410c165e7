"""Layout planner: enumerate dp x tp x pp x cp layouts, predict memory and step time, pick the best.

`train.py --plan` prints the ranked table (plan_main); `parallel.auto` / `cp_strategy: auto` resolve
through resolve_auto before the mesh is built. Formulas: memory.py, cost.py and docs/parallelism.md.
"""

from parallel.planner.auto import resolve_auto, wants_auto
from parallel.planner.calibration import DeviceRates, load_rates
from parallel.planner.cost import StepTime, step_time
from parallel.planner.enumerate import Candidate, Layout, enumerate_layouts
from parallel.planner.memory import MemoryBreakdown, ModelShape, Workload, memory_breakdown
from parallel.planner.report import PlanRow, compare_with_measurements, plan_main, plan_rows

__all__ = [
    "Candidate",
    "DeviceRates",
    "Layout",
    "MemoryBreakdown",
    "ModelShape",
    "PlanRow",
    "StepTime",
    "Workload",
    "compare_with_measurements",
    "enumerate_layouts",
    "load_rates",
    "memory_breakdown",
    "plan_main",
    "plan_rows",
    "resolve_auto",
    "step_time",
    "wants_auto",
]
