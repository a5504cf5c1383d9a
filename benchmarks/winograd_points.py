"""Interpolation points for F(2x2, 5x5): the fp32 error against float64, and the cancellation ratio.

    PYTHONPATH=. python benchmarks/winograd_points.py [--seed 0]

Builds F(2, 5)'s A^T (2 x 6), G (6 x 5) and B^T (6 x 6) from five finite points and infinity
(Toom-Cook: A^T evaluates at the points, G's row j is the point's (1, p, ..., p^4) over
prod_{l != j} (p - p_l), and B^T solves the identity A^T [(G g) . (B^T d)] = the correlation
of d with g), then for each point set and channel pair simulates a 5x5 'same' convolution
of random post-ReLU inputs and weights in float32 the way csrc/winograd.h runs it (U rounded
once from float64, V, the per-position channel sums and the output transform in fp32) and
reports ||y - y64|| / ||y64|| next to the direct fp32 convolution's. For the kernel's points
(0, +-2/3, +-3/2) it also reports the ratio that the cancellation check bounds
(Transform::kCancellation): S = sum over positions of max_i |A^T[i][a]| |M_a| against the
largest output after ReLU, per (2x2 tile, 32-column panel).
The kernel's B^T is checked to equal F(4x4, 3x3)'s for the same points (its input
transform is shared).
"""

from __future__ import annotations

import argparse
from fractions import Fraction

import torch

POINT_SETS = {"0, +-2/3, +-3/2 (the kernel's)": (Fraction(2, 3), Fraction(3, 2)),
              "0, +-1/2, +-2": (Fraction(1, 2), Fraction(2)),
              "0, +-1, +-2 (Lavin and Gray)": (Fraction(1), Fraction(2))}
CHANNELS = [(48, 64), (32, 128), (192, 64), (16, 32)]


def toom_cook(a: Fraction, b: Fraction, m: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T, G, B^T) of F(m, r) over the points 0, +-a, +-b and infinity, float64."""
    points = [Fraction(0), a, -a, b, -b]
    alpha = m + r - 1
    at = torch.zeros(m, alpha, dtype=torch.float64)
    g = torch.zeros(alpha, r, dtype=torch.float64)
    for j, p in enumerate(points):
        scale = 1
        for q in points:
            if q != p:
                scale *= p - q
        at[:, j] = torch.tensor([float(p ** i) for i in range(m)], dtype=torch.float64)
        g[j] = torch.tensor([float(p ** k / scale) for k in range(r)], dtype=torch.float64)
    at[m - 1, alpha - 1] = g[alpha - 1, r - 1] = 1
    # B^T: sum_a A^T[i, a] G[a, k] B^T[a, j] = [j == i + k] for every output i and tap k.
    rows = torch.zeros(m * r * alpha, alpha * alpha, dtype=torch.float64)
    rhs = torch.zeros(m * r * alpha, dtype=torch.float64)
    for i in range(m):
        for k in range(r):
            for j in range(alpha):
                row = torch.zeros(alpha, alpha, dtype=torch.float64)
                row[:, j] = at[i] * g[:, k]
                rows[(i * r + k) * alpha + j] = row.flatten()
                rhs[(i * r + k) * alpha + j] = float(j == i + k)
    bt = torch.linalg.lstsq(rows, rhs.unsqueeze(1)).solution.reshape(alpha, alpha)
    assert torch.allclose(rows @ bt.flatten(), rhs, atol=1e-10), "no B^T for these points"
    return at, g, bt


def simulate(at, g, bt, cin: int, cout: int, gen: torch.Generator, n: int = 4, grid: int = 12):
    """(Winograd fp32 error, direct fp32 error, cancellation ratios) of one 5x5 'same'
    convolution with ReLU over random post-ReLU inputs, against float64."""
    x = torch.relu(torch.randn(n, cin, grid, grid, generator=gen, dtype=torch.float64))
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    w = torch.randn(cout, cin, 5, 5, generator=gen, dtype=torch.float64) / (cin * 25) ** 0.5
    y64 = torch.nn.functional.conv2d(x, w)
    y32 = torch.nn.functional.conv2d(x.float(), w.float()).double()
    f = torch.float32
    u = torch.einsum("ar,ocrs,bs->ocab", g, w, g).to(f)
    at32, bt32 = at.to(f), bt.to(f)
    out = torch.empty_like(y64, dtype=f)
    weights = torch.outer(at.abs().amax(0), at.abs().amax(0)).to(f)
    ratios = []
    for i in range(0, grid, 2):
        for j in range(0, grid, 2):
            v = torch.einsum("ar,ncrs,bs->ncab", bt32, x[:, :, i:i + 6, j:j + 6].to(f), bt32)
            m = torch.einsum("ncab,ocab->noab", v, u)
            out[:, :, i:i + 2, j:j + 2] = torch.einsum("ia,noab,jb->noij", at32, m, at32)
            s = torch.einsum("ab,noab->no", weights, m.abs())
            top = torch.relu(out[:, :, i:i + 2, j:j + 2]).flatten(2).amax(2)
            for p0 in range(0, cout, 32):
                ratios.append((s[:, p0:p0 + 32].amax(1) / top[:, p0:p0 + 32].amax(1).clamp_min(1e-30)))

    def rel(y):
        return ((y.double() - y64).norm() / y64.norm()).item()

    return rel(out), rel(y32), torch.cat(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    kernel_bt = toom_cook(Fraction(2, 3), Fraction(3, 2), 4, 3)[2]  # F(4x4, 3x3)'s
    print("| points | cin -> cout | Winograd error | direct fp32 error | S / max output: median, max |")
    print("|---|---|---:|---:|---|")
    for name, (a, b) in POINT_SETS.items():
        at, g, bt = toom_cook(a, b, 2, 5)
        if a == Fraction(2, 3):
            assert torch.allclose(bt, kernel_bt, atol=1e-12), "F(2x2, 5x5)'s B^T is not F(4x4, 3x3)'s"
        for cin, cout in CHANNELS:
            err, direct, ratios = simulate(at, g, bt, cin, cout, gen)
            cancel = f"{ratios.median().item():.0f}, {ratios.max().item():.0f}" if a == Fraction(2, 3) else ""
            print(f"| {name} | {cin} -> {cout} | {err:.1e} | {direct:.1e} | {cancel} |", flush=True)


if __name__ == "__main__":
    main()
