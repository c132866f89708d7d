"""The engine: one training loop and one run sequence for every task, beside the model stack.

config (typed configs, recipes, the engine's section and its checks), dist (processes, sampler,
RNG state), trainer (the loop), log (metrics, progress, TensorBoard), checkpoints (step folders),
run (run folders and the run sequence), plots (curves and figures).
"""
from .config import EngineConfig, check_engine_config, check_engine_settings, cpu_has_native_bf16, load_config, save_config
from .dist import DistInfo, ResumableSampler, all_reduce_sum, eval_loader, keep_freed_memory, setup_distributed, unwrap
from .log import MetricsLogger, final_val_metrics, progress_bar, read_metrics, setup_logging
from .run import Built, RunTask, lock_run_folder, render_report, resolve_run, start_run, train, unlock_run_folder
from .trainer import Task, Trainer

__all__ = ["Built", "DistInfo", "EngineConfig", "MetricsLogger", "ResumableSampler", "RunTask", "Task", "Trainer",
           "all_reduce_sum", "check_engine_config", "check_engine_settings", "cpu_has_native_bf16", "eval_loader",
           "final_val_metrics", "keep_freed_memory", "load_config", "lock_run_folder", "progress_bar", "read_metrics", "render_report",
           "resolve_run", "save_config", "setup_distributed", "setup_logging", "start_run", "train", "unlock_run_folder",
           "unwrap"]
