"""A quality gate's arithmetic: how far a metric fell, and whether that is within what is allowed.

Every gate that holds a drop against an allowance uses these: the optimize gate
(``kiln.optimize.validate.judge``), the accuracy-aware retry that aims at it
(``kiln.backends.ort_quantize.accuracy_aware_quantize``), re-optimization's candidate against
production (``kiln.optimize.reoptimize.compare``) and the rollout's champion/challenger gate
(``tasks/deploy.py``). How much a model may lose (per task) is
``kiln.optimize.validate.GateSettings.allowed_drop``; this module only compares, so the layers
below ``kiln.optimize`` (the backends) decide the same way.

Metrics are "higher is better" (accuracy, negative RMSE, mean cosine), so a drop is
``baseline - metric``.
"""

from __future__ import annotations

import math

# Half a point of accuracy: the default allowed drop of the optimize gate
# (GateSettings.max_accuracy_drop) and of the champion gate (RolloutSettings.champion_max_drop).
MAX_ACCURACY_DROP = 0.005

# A drop is judged as reports show it: to this many decimals (so a report never shows a
# failing drop equal to its allowance) ...
DROP_DECIMALS = 6
# ... against the allowance plus this, which absorbs binary rounding in the allowance itself
# (a relative allowance is a product of two decimals).
DROP_TOLERANCE = 1e-12


def metric_drop(baseline: float, metric: float) -> float:
    """How far ``metric`` fell below ``baseline``, to ``DROP_DECIMALS`` decimals (the report's
    figure; negative when the metric rose)."""
    return round(baseline - metric, DROP_DECIMALS)


def within(drop: float, allowed: float) -> bool:
    """Whether a metric drop is within the allowed drop. A drop that is not a finite number
    (a metric that came out NaN) never is."""
    return math.isfinite(drop) and round(drop, DROP_DECIMALS) <= allowed + DROP_TOLERANCE
