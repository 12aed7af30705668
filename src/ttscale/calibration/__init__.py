"""Calibration that runs the engine: the step-time model's row tables and overhead fit
(steps.py) and the `ttscale calibrate` command (cli.py). The fit's math and the roofline
measurement stay in the pure cost model (`ttscale.cost.steptime`, `ttscale.cost.calibrate`)."""
