"""turbo_train: Lightning modules per method (flow matching, rCM, SLA, calibration), data, toy
world, export, evaluation and the `turbo-train` recipes CLI."""
