"""The GAN itself, readable in one sitting: the paper's G and D (models), their losses, one training step
(step; static shapes so that a CUDA graph can capture it: cuda_graph), the weight average of G (ema), and
the pytorch/examples step it is measured against (reference). Nothing here knows about files or launchers.
"""
