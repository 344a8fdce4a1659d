"""The λ calibration's choice among measured trials (:func:`editing.editors.memit.knee_lambda`)."""
from __future__ import annotations

from editing.editors.memit import knee_lambda

# measured on the DVC-built fact world (fingerprint 5b6212ff…, 2026-12-03): its first four requests, layers
# 0–1 at the prompt's last token; one request takes at no λ of the grid
FACT_WORLD_TRIALS = [
    {"lam": 1e4, "success": 0.0, "max_relative_residual": 0.8505},
    {"lam": 3e3, "success": 0.0, "max_relative_residual": 0.6842},
    {"lam": 1e3, "success": 0.5, "max_relative_residual": 0.4809},
    {"lam": 3e2, "success": 0.75, "max_relative_residual": 0.3502},
    {"lam": 1e2, "success": 0.75, "max_relative_residual": 0.3468},
    {"lam": 30.0, "success": 0.75, "max_relative_residual": 0.342},
    {"lam": 10.0, "success": 0.75, "max_relative_residual": 0.3396},
    {"lam": 3.0, "success": 0.75, "max_relative_residual": 0.3386},
    {"lam": 1.0, "success": 0.75, "max_relative_residual": 0.3381},
    {"lam": 0.3, "success": 0.75, "max_relative_residual": 0.337},
    {"lam": 0.1, "success": 0.75, "max_relative_residual": 0.3349},
]


def test_a_request_no_lambda_makes_take_does_not_send_lambda_to_the_bottom_of_the_grid():
    # the best rate is 0.75; its residuals are within 1.1 x the floor from λ 300 down: the knee is 300, not 0.1
    assert knee_lambda(FACT_WORLD_TRIALS, residual_tol=0.3) == 3e2


def test_the_knee_among_trials_where_every_edit_takes():
    trials = [{"lam": 1e4, "success": 0.5, "max_relative_residual": 0.9},
              {"lam": 3e3, "success": 1.0, "max_relative_residual": 0.47},
              {"lam": 1e3, "success": 1.0, "max_relative_residual": 0.45},
              {"lam": 3e2, "success": 1.0, "max_relative_residual": 0.44}]
    assert knee_lambda(trials, residual_tol=0.3) == 3e3            # 0.47 <= 1.1 x 0.44
    assert knee_lambda(trials[:1] + trials[2:], residual_tol=0.3) == 1e3
    # a tolerance above every residual: the strongest λ at the best rate
    assert knee_lambda(trials, residual_tol=0.95) == 3e3


def test_without_a_trial_within_the_knee_the_best_rate_with_the_smallest_residual():
    # the floor belongs to a trial at a lower rate; of the best-rate trials the smallest residual wins
    trials = [{"lam": 1e3, "success": 1.0, "max_relative_residual": 0.8},
              {"lam": 3e2, "success": 1.0, "max_relative_residual": 0.6},
              {"lam": 1e2, "success": 0.75, "max_relative_residual": 0.2}]
    assert knee_lambda(trials, residual_tol=0.3) == 3e2
