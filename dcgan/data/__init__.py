"""Images in, batches out: shards written once from image folders, MNIST or the built-in digits (writer,
inputs, formats), found locally or over HTTP (shards, remote), cut into partitions every rank can share
(partitions), and streamed per rank (stream) or read whole outside training (offline); `build_source`
(build) picks the source a config asks for.
"""
