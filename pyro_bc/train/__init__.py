"""Training by SVI: the loop and fit, its config and run directories, checkpoints, schedules, several processes."""
