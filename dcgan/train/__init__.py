"""Training: the loop (loop), the state it carries and resumes (trainer), what it reports (tracking,
window), stopping on a signal or preemption (preemption), the data partitions of a run (run_partitions),
and the plan `--dry-run` prints (plan).
"""
