"""skyjax: Skywork-VL Reward and Skywork R1V in JAX/Flax NNX, built for TPU pods."""

__version__ = "0.1.0"
