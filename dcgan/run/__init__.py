"""A run on disk: its directory and lock (rundir), checkpoints written through DCP and the schema of what
they hold (checkpoint, schema), the metric lines of stats.jsonl (stats), wandb's offline segments
(wandb_files), and how often to checkpoint for a job's failure rate (interval).
"""
