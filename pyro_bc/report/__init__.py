"""A run's report: the ArviZ DataTree, the plots, and report.md."""
