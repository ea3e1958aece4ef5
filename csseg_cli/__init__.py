"""The ``csseg`` command line (entry point: ``cli:app``, ``cli.py``): a thin Typer layer, parse ->
frozen config -> call csseg_core / sweeper.

* :mod:`csseg_cli.common`: the app, one-line errors, the console, percentages;
* :mod:`csseg_cli.runs`: scenarios, methods, data synth, train, test (and the ``--config`` reader);
* :mod:`csseg_cli.sweeps`: spaces, sweep, results, export-best, report, dashboard, final.

Importing :mod:`cli` registers every command, in this order.
"""
