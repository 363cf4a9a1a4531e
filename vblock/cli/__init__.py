"""The ``vblock`` command line: ``main.py`` is the entry point and the error boundary; one module
per verb; ``status.py`` names the exit codes; ``output.py`` and ``progress.py`` hold the shared
output helpers."""
