"""Inference services of MSDNet: budgeted batch classification (threshold calibration)."""

from .calibration import (assign_exits, calibrate_thresholds, confidences, exit_counts,
                          exit_predictions, exit_proportions, expected_cost)

__all__ = ["exit_proportions", "confidences", "calibrate_thresholds", "assign_exits",
           "exit_predictions", "exit_counts", "expected_cost"]
