"""Using and judging a trained generator: loading it with the right BatchNorm statistics (generators),
the metrics and the evaluation that computes them (metrics, evaluate, digits_score), the paper's
experiments (latent, probe), seeds compared with intervals (compare, spread, recipe), and the HTML
report of a run (report).
"""
