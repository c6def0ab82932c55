"""Every test runs on 8 fake CPU devices, so meshes up to (2, 2, 2) can be built and checked."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

# Several tests build identical programs (a trainer resumed from its checkpoint compiles the same step again):
# a per-session persistent compilation cache turns the repeats into cache hits.
import tempfile  # noqa: E402

# one directory for every xdist worker of this machine (entries are keyed by the program, so sharing is safe)
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "SKYJAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "skyjax-test-jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
