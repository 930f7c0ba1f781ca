"""Running on clusters: the preflight of an allocation (doctor, doctor_links, doctor_report), the
throughput benchmarks (bench), and SLURM submission (slurm, sweep; slurm_job is what runs on the nodes).
"""
