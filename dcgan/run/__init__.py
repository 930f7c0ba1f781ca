"""A run on disk: its directory and lock (rundir), checkpoints written through DCP and the schema of what
they hold (checkpoint, schema), the metric lines of stats.jsonl (stats), and wandb's offline segments
(wandb_files).
"""
