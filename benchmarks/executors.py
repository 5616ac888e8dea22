"""Wall time of one small ``compare`` grid on a local Ray instance relative to the local process pool.

Both executors get the same workers (``--workers`` processes / Ray CPUs, one torch thread per run) and the
same grid: the MNIST-1D CNN, norms bn and gn, batch sizes 16 and 128, one lr, ``--seeds`` seeds, ``--epochs``
epochs, each into its own fresh store. Reported: seconds for each and the ratio ray / pool (Ray's time
includes starting the Ray instance and its workers, which is what a user pays). Needs ``normlab[ray]``.
Usage: ``python benchmarks/executors.py [--workers 2] [--seeds 2] [--epochs 2] [--subset 2000]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from normlab.store import Store
from normlab.sweep import LocalPoolExecutor, compare_configs, run_sweep


def grid(seeds: int, epochs: int, subset: int) -> list:
    return compare_configs(model="cnn", norms=["bn", "gn"], batch_sizes=[16, 128], seeds=list(range(seeds)),
                           base_lrs=[0.1], agc_clip=0.02, group="bench/executors", epochs=epochs,
                           dataset="mnist1d", subset=subset)


def timed(make_executor, configs, folder: Path, name: str) -> tuple[float, list]:
    started = time.perf_counter()  # starting the pool / the Ray instance is part of the time
    with Store(folder / f"{name}.sqlite") as store, make_executor() as executor:
        results = run_sweep(configs, store, executor)
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=2000)
    args = parser.parse_args()
    from normlab.sweep.ray_executor import RayExecutor

    configs = grid(args.seeds, args.epochs, args.subset)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pool_s, pool = timed(lambda: LocalPoolExecutor(args.workers), configs, folder, "pool")
        options = {"num_cpus": args.workers, "object_store_memory": 80 * 1024**2}
        ray_s, ray = timed(lambda: RayExecutor(cpus_per_run=1, init_options=options), configs, folder, "ray")
    same = all(a.final_test_acc == b.final_test_acc for a, b in zip(pool, ray, strict=True))
    print(f"{len(configs)} runs, {args.workers} workers: pool {pool_s:.1f} s, ray {ray_s:.1f} s, "
          f"ray / pool = {ray_s / pool_s:.2f}; identical test accuracies: {same}")


if __name__ == "__main__":
    main()
