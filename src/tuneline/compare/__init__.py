"""``tuneline compare``: base models x training methods trained on the same data, scored on the same
test items with intervals and paired tests, with what each costs; the cheapest not significantly
worse than the best is recommended."""

from tuneline.compare.plan import LR_FACTOR, default_lr, plan
from tuneline.compare.results import COST_RULE, Combination, CompareReport, Measured, recommend
from tuneline.compare.runner import COMPARE_FILE, CompareOptions, combination_key, compare
from tuneline.compare.table import compare_table

__all__ = ["COMPARE_FILE", "COST_RULE", "LR_FACTOR", "Combination", "CompareOptions", "CompareReport", "Measured",
           "combination_key", "compare", "compare_table", "default_lr", "plan", "recommend"]
