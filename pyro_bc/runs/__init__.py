"""The run-directory layer: a run folder (config, checkpoint, metrics) to and from the library's functions; the
only part of the library that imports the command line's networks (``models``)."""
