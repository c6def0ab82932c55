"""What a benchmark ran on (recorded in every benchmark JSON): platform, backend, devices, load, versions."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    import importlib.metadata as md

    import jax

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    devices = jax.devices()
    return {"platform": platform.platform(), "python": platform.python_version(), "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "device_count": len(devices), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "jax": jax.__version__, "jaxlib": version("jaxlib"), "flax": version("flax"), "torch": version("torch"),
            "transformers": version("transformers"), "xla_flags": os.environ.get("XLA_FLAGS", "")}
