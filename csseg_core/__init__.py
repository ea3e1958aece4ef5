"""csseg's engine: continual semantic segmentation in torch only (it never imports Ray).

The public surface, what ``cli.py``, ``sweeper``, ``search_spaces``, ``bench/`` and user code may
import (every name without a leading underscore in these modules; ``docs/ARCHITECTURE.md`` has the
contracts)::

    errors        CssegError, ConfigError, DataError, TrainingError, first_line
    scenarios     Scenario, get_scenario, list_scenarios, check_mode, MODES
    config        ExperimentConfig, resolve_config, parse_set, read_config_file, select_entries, config_entries
    data          build_datasets, default_data_root, heldout_mask, csseg_home, synth.generate
    models        build_model, load_previous, IncrementalSegmenter
    metrics       ConfusionMatrix, step_metrics, KINDS, METRICS, ALL_METRICS, format_percent, split_metric
    losses        the pure loss functions methods combine (SDR's latent-space ones included)
    methods       register_method, Method, StepContext, weight, get_method, list_methods, method_defaults, STATISTICS
    collectors    register_statistic, held_statistics, build_collectors (what a step collects)
    engine        run_step, evaluate, make_loader, default_device, timed_phases, plan_step, StepPlan
    scenario_run  run_scenario, checkpoint_path, shared_step0_path, shared_step0 (all steps of one configuration, on disk)
    evaluation    evaluate_state (``csseg test``)
    state         save_state, load_state, state_to_numpy, state_from_numpy
    results       step_row, append_rows, read_rows, METRIC_KEYS (the Parquet tables)
    atomic        atomic_path (the one temporary-file + rename writer)
    report        the figures and report.html / report.md of a run folder
    distributed   launch, spawn (DDP on one machine)

Internal (reach them through the modules above): ``plan`` (through ``engine``), ``latent_losses``
(through ``losses``), ``tensorboard``, and every ``_``-prefixed module or name.
"""

__all__ = [
    "atomic", "collectors", "config", "data", "distributed", "engine", "errors", "evaluation", "losses", "methods",
    "metrics", "models", "report", "results", "scenario_run", "scenarios", "state",
]
