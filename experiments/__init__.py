"""Study runners, run from the project root as modules: ``python -m experiments.<study>``; their shared
run-or-resume step is ``experiments.runner``."""
