"""The run machinery: the command line (:mod:`.cli`), what it does with the objects it builds (:mod:`.app`), the
end-of-run evaluation (:mod:`.report`), and the run's files: its layout (:mod:`.rundir`), checkpoints, loggers."""
