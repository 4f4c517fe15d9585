"""The machine's fp32 matmul rate, which every timing in the README is quoted beside.

    python bench/matmul.py            # median of 20 products of two 2048 x 2048 fp32 matrices
"""
import statistics
import time

import torch


def main(n: int = 2048, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    rate = 2 * n**3 / statistics.median(times) / 1e9
    print(f"fp32 {n}x{n} matmul: {rate:.0f} GFLOP/s ({torch.get_num_threads()} threads, "
          f"torch {torch.__version__})")
    return rate


if __name__ == "__main__":
    main()
