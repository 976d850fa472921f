"""The calibration pipeline: per-layer input statistics block by block (calibrate), the plan of which
layers get which correction (plan), and the per-layer pass that computes them (initialize)."""
