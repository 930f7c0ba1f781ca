"""Many processes as one run: who this process is (env), the process group (session), wrapping models
(parallelize), collectives and the clock of time spent in them (collectives), BatchNorm across ranks
(batchnorm), and the watchers that turn a lost host, a hang or a slow rank into one line (liveness,
reaper, hang, stragglers), talking through the rendezvous store (store).
"""
