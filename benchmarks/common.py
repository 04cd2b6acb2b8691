"""Shared by the benchmark scripts: CPU device set-up, matmul peak, result line."""

from __future__ import annotations

import time


def use_cpu_cores(n: int | None = None) -> int:
    """One XLA host device per core, as train.py does (call before JAX starts); the count."""
    from transformer_jax.parallel import cpu_cores, use_cpu_devices

    n = n or cpu_cores()
    use_cpu_devices(n)
    return n


def best_seconds(fn, repeats: int) -> float:
    """Shortest of `repeats` timed calls of `fn` (which must block until its result is
    ready), after one untimed call that compiles and warms up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Best FLOP/s of an n^3 matmul over all devices (on CPUs, numpy's if that is faster)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    best = lambda fn: best_seconds(fn, repeats)
    rates = []
    if dtype == "float32" and jax.default_backend() == "cpu":
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        rates.append(2 * n**3 / best(lambda: a @ a))
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(jnp.ones((len(devices), n, n), dtype), NamedSharding(mesh, P("d")))
    mm = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    rates.append(len(devices) * 2 * n**3 / best(lambda: mm(x).block_until_ready()))
    return max(rates)


def report(**figures) -> None:
    """The last line of every benchmark: key=value pairs."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in figures.items()), flush=True)
