"""The FID workflow: pytorch-fid's InceptionV3 (2048-d pool features) and timm's
inception_v3 (logits), the original model in eager mode against swap_inception,
torch.compile and torch.compile(swap_inception(model)).

For each contender: features per second over N images (one full pass per contender,
contenders alternating, medians of the rounds, one process), the largest per-image
relative L2 error of its features against the original's, and the Fréchet distance
between two random image sets computed from its features against the one from the
original's (the issue asks for 1e-4 relative between original and swapped).

A thin layer over the public API (swap_inception) and bench's helpers; only cli.py
imports it. Needs pytorch-fid, timm and scipy (the `[test]` extras).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence
from unittest import mock

import numpy as np
import torch
from torch import nn

from .bench import _compiled, _sync, machine_info
from .fused import FusedInception
from .fused_graph import FusedBranchGraph
from .swap import swap_inception

__all__ = ["CONTENDERS", "FID_RTOL", "FidBenchReport", "FidRow", "FidTable", "fid_bench", "fid_from_features",
           "fid_inception_v3", "frechet_distance", "timm_inception_v3"]

CONTENDERS = ("eager", "swapped", "compile", "compile(swapped)")
MODELS = ("pytorch-fid", "timm")
FID_RTOL = 1e-4  # the issue: original and swapped FIDs agree to this, relative
IMAGE_SIZE = 299
# Inception-v3's blocks by class: torchvision's and timm's InceptionA..E, pytorch-fid's FID* subclasses.
_BLOCK_CLASS = re.compile(r"^(FID)?Inception[A-E](_\d)?$")


# -- models ----------------------------------------------------------------------


def _random_bn_statistics_(model: nn.Module, forward: Callable[[torch.Tensor], object], seed: int) -> None:
    """BN statistics measured on two random images, then perturbed (and random affine
    parameters): the default 0/1 statistics shrink the pool features of a randomly
    initialised Inception-v3 to ~1e-8 and make BN folding trivial."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    generator = torch.Generator().manual_seed(seed)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        forward(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    model.eval()
    with torch.no_grad():
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum

            def uniform(lo: float, hi: float, n: int = bn.num_features) -> torch.Tensor:
                return torch.empty(n).uniform_(lo, hi, generator=generator)

            bn.running_var.mul_(uniform(0.5, 2.0))
            bn.running_mean.add_(uniform(-0.2, 0.2) * bn.running_var.sqrt())
            bn.weight.copy_(uniform(0.5, 1.5))
            bn.bias.copy_(uniform(-0.2, 0.2))


def fid_inception_v3(weights: str | None = None, seed: int = 0) -> nn.Module:
    """pytorch-fid's `InceptionV3([3], use_fid_inception=True)` (2048-d pool features,
    input float in [0, 1], resized and normalised inside), built without any download.

    pytorch-fid's own constructor runs; only its `load_state_dict_from_url` is replaced
    for the duration: with `weights` (a state dict file such as
    pt_inception-2015-12-05-6726825d.pth) it returns that file, which pytorch-fid then
    loads strictly; without, the model's own random weights (seeded; the global random
    stream is left where it was), after which the BN statistics are randomised.
    Returns the model in eval mode.
    """
    import pytorch_fid.inception as pfi

    built: list[nn.Module] = []
    make = pfi._inception_v3

    def recording(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    def offline(url, *args, **kwargs):
        if url != pfi.FID_WEIGHTS_URL:
            raise RuntimeError(f"fid_inception_v3: unexpected download of {url}")
        if weights is not None:
            return torch.load(weights, map_location="cpu", weights_only=True)
        # By now pytorch-fid has put its FID blocks into the recorded torchvision model:
        # its own state dict has every key and shape, so the strict load is a no-op.
        return {k: v.clone() for k, v in built[-1].state_dict().items()}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with mock.patch.object(pfi, "_inception_v3", recording), \
                mock.patch.object(pfi, "load_state_dict_from_url", offline):
            model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True)
        if weights is None:
            _random_bn_statistics_(model, model, seed)
    return model.eval()


def timm_inception_v3(seed: int = 0) -> nn.Module:
    """timm's `inception_v3` (pretrained=False: random weights, seeded) with randomised BN
    statistics, eval mode. Input: normalised as timm's config says, (x - 0.5) / 0.5."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("inception_v3", pretrained=False)
        _random_bn_statistics_(model, lambda x: model(_timm_input(x)), seed)
    return model.eval()


def _timm_input(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


# model name -> (title, what the features are, builder(weights, seed), features(model, x), input transform)
_MODELS = {
    "pytorch-fid": ("pytorch-fid InceptionV3", "2048-d pool features",
                    lambda weights, seed: fid_inception_v3(weights, seed), lambda m, x: m(x)[0].flatten(1),
                    lambda x: x),
    "timm": ("timm inception_v3", "1000 logits", lambda weights, seed: timm_inception_v3(seed), lambda m, x: m(x),
             _timm_input),
}


# -- Fréchet distance ------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): pytorch-fid's
    calculate_frechet_distance (float64, scipy.linalg.sqrtm, eps added to the diagonals
    when the product is singular), its message to stdout sent to stderr and scipy's
    deprecation warning about its `disp` argument silenced."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    as64 = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        return float(calculate_frechet_distance(*as64, eps=eps))


def fid_from_features(features1, features2) -> tuple[float, str]:
    """FID between two sets of features (rows), in float64, and the method used.

    With more images than feature dimensions: the statistics as pytorch-fid computes them
    (mean, np.cov) through frechet_distance. With fewer (covariances of rank < d), the
    exact identity Tr sqrt(S1 S2) = ||A1 A2^T||_* (S_i = A_i^T A_i, A_i the centred rows
    over sqrt(n_i - 1)): an SVD of an n1×n2 matrix instead of scipy's sqrtm of a d×d
    product that is singular there (and took 18-25 s at d = 2048 on this 2-core machine).
    """
    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if min(len(f1), len(f2)) < 2:
        raise ValueError(f"the FID needs at least 2 images per set, got {len(f1)} and {len(f2)}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    if max(len(f1), len(f2)) <= f1.shape[1]:
        a1, a2 = (f1 - mu1) / np.sqrt(len(f1) - 1), (f2 - mu2) / np.sqrt(len(f2) - 1)
        diff = mu1 - mu2
        nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
        return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * nuclear), "low-rank exact (SVD)"
    return (frechet_distance(mu1, np.cov(f1, rowvar=False), mu2, np.cov(f2, rowvar=False)),
            "pytorch-fid calculate_frechet_distance")


# -- the benchmark ---------------------------------------------------------------


def _short(reason: str) -> str:
    """A swap_inception reason with its torch.fx node printed as a call: `avg_pool2d(%x, kernel_size: 3, ...)`."""
    return re.sub(r"%(\w+) : \[num_users=\d+\] = call_function\[target=[\w.]+\]\(args = \((.*?),?\), "
                  r"kwargs = \{(.*?)\}\)", r"\1(\2, \3)", reason)


@dataclass
class FidRow:
    contender: str
    seconds: float  # median of the rounds, model calls only, one full pass over the N images
    features_per_s: float
    speedup: float  # eager's seconds over this contender's
    max_rel_err: float  # the largest per-image relative L2 error of the features against eager's
    fid: float
    fid_rel_diff: float  # |fid - eager's fid| / eager's fid
    compile_s: float | None = None
    round_seconds: list[float] = field(default_factory=list)


@dataclass
class FidTable:
    model: str
    features: str
    blocks: int  # Inception blocks in the model
    fused: list[str]  # the ones swap_inception fused
    unfused: dict[str, str]  # name -> why swap_inception left it (its log)
    fid_method: str
    rows: list[FidRow]
    conv_units: list[str] = field(default_factory=list)  # lone conv units fused by swap_inception(convs=True)

    @property
    def ok(self) -> bool:
        """Original and swapped FIDs agree to FID_RTOL (True without a swapped row)."""
        return all(r.fid_rel_diff <= FID_RTOL for r in self.rows if r.contender == "swapped")

    def to_markdown(self) -> str:
        units = (f" and the {len(self.conv_units)} conv units of the stem (`convs=True`: "
                 f"{', '.join(self.conv_units)})" if self.conv_units else "")
        lines = [f"**{self.model}** ({self.features}): swap_inception fused **{len(self.fused)} of "
                 f"{self.blocks}** Inception blocks{units}; FID by {self.fid_method}.", "",
                 "| contender | features/s | vs eager | max rel. error of features | FID | FID rel. diff | compile s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            compile_s = "" if r.compile_s is None else f"{r.compile_s:.0f}"
            lines.append(f"| {r.contender} | {r.features_per_s:.2f} | {r.speedup:.2f}× | {r.max_rel_err:.1e} | "
                         f"{r.fid:.6g} | {r.fid_rel_diff:.1e} | {compile_s} |")
        if self.unfused:
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.unfused.items():
                by_reason.setdefault(_short(reason), []).append(name)
            lines.append("")
            lines += [f"- left unfused ({', '.join(names)}): {reason}" for reason, names in by_reason.items()]
        swapped = [r for r in self.rows if r.contender == "swapped"]
        if swapped:
            lines += ["", f"Original against swapped FID: {swapped[0].fid_rel_diff:.1e} relative, "
                          f"{'PASS' if self.ok else 'FAIL'} at {FID_RTOL:.0e}."]
        return "\n".join(lines)


@dataclass
class FidBenchReport:
    machine: dict[str, str]
    n_images: int
    batch: int
    rounds: int
    seed: int
    weights: str | None
    tables: list[FidTable]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    def to_markdown(self) -> str:
        m = self.machine
        weights = f"weights from {self.weights}" if self.weights else "random weights and BN statistics"
        head = (f"{self.n_images} random 299×299 uint8 images per set (two sets, seeds {self.seed} and "
                f"{self.seed + 1}), batch {self.batch}, float32, channels_last, {weights}; features/s: N over "
                f"the median of {self.rounds} timed full pass(es) per contender, contenders alternating in one "
                f"process; errors and FIDs against the original model in eager mode. "
                f"Machine: {m['cpu']}{'' if m['threads'] == 'GPU' else ', ' + m['threads'] + ' threads'}, "
                f"torch {m['torch']}, {m['date']}"
                + (f"; allocator: {m['allocator']}" if m.get("allocator") else "")
                + (f"; {m['tf32']}." if "tf32" in m else "."))
        return "\n\n".join([head, *(t.to_markdown() for t in self.tables)])

    def to_json_dict(self) -> dict:
        data = asdict(self)
        for table, t in zip(data["tables"], self.tables):
            table["ok"] = t.ok
        data["ok"] = self.ok
        data["fid_rtol"] = FID_RTOL
        return data


def _batches(n: int, batch: int, seed: int, transform: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device = torch.device("cpu")) -> Iterator[torch.Tensor]:
    """n random uint8 HWC images, converted as pytorch-fid's loader does (ToTensor: float in
    [0, 1], CHW), batch by batch: channels_last (a permuted NHWC tensor), float32, on
    `device` (drawn on the CPU, so the images are the same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        images = torch.randint(0, 256, (min(batch, n - start), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8,
                               generator=generator)
        x = images.to(device).permute(0, 3, 1, 2).float().div_(255)
        yield transform(x).contiguous(memory_format=torch.channels_last)


def _pass(run: Callable[[torch.Tensor], torch.Tensor], batches: Iterator[torch.Tensor], keep: bool
          ) -> tuple[float, np.ndarray | None]:
    """Seconds spent in the model over all batches (making the images is not timed), and the features."""
    seconds, features = 0.0, []
    with torch.no_grad():
        for x in batches:
            _sync(x.device)
            start = time.perf_counter()
            y = run(x)
            _sync(x.device)
            seconds += time.perf_counter() - start
            if keep:
                features.append(y.float().numpy(force=True))
    return seconds, np.concatenate(features) if keep else None


@contextlib.contextmanager
def _unfused_log() -> Iterator[dict[str, str]]:
    """swap_inception's 'left NAME (CLASS) unfused: REASON' warnings, as {NAME: REASON}."""
    found: dict[str, str] = {}

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.msg, str) and record.msg.startswith("swap_inception: left") and record.args:
                found[str(record.args[0])] = str(record.args[2])

    logger, handler = logging.getLogger("inception_fast"), Handler(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


def _bench_model(key: str, n: int, batch: int, weights: str | None, contenders: Sequence[str], rounds: int,
                 seed: int, progress: Callable[[str], None], device: torch.device, convs: bool = True) -> FidTable:
    title, what, build, features_of, transform = _MODELS[key]
    progress(f"[{key}] building {title} ({'weights ' + weights if weights else 'random weights'}) and swapping ...")
    original = build(weights, seed).to(device=device, memory_format=torch.channels_last)
    blocks = [name for name, m in original.named_modules() if _BLOCK_CLASS.match(type(m).__name__)]
    with _unfused_log() as unfused:
        swapped = swap_inception(copy.deepcopy(original), convs=convs)
    fused_all = [name for name, m in swapped.named_modules() if isinstance(m, (FusedInception, FusedBranchGraph))]
    fused = [name for name in fused_all if name in blocks]
    conv_units = [name for name in fused_all if name not in blocks]
    progress(f"[{key}] swap_inception fused {len(fused)} of {len(blocks)} Inception blocks"
             + (f" and {len(conv_units)} conv units" if convs else ""))
    models = {"eager": original, "swapped": swapped}
    compile_s: dict[str, float] = {}
    example = next(_batches(n, batch, seed, transform, device))
    for name in contenders:
        if name.startswith("compile"):
            progress(f"[{key}] compiling {name} (inductor, freezing) ...")
            start = time.perf_counter()
            models[name] = _compiled(copy.deepcopy(swapped if name == "compile(swapped)" else original), example)
            compile_s[name] = time.perf_counter() - start
    runs = {name: (lambda x, m=models[name]: features_of(m, x)) for name in contenders}

    # Untimed: every contender's features of both sets (the first pass also warms up).
    feats = {}
    for name in contenders:
        progress(f"[{key}] features of both image sets: {name} ...")
        feats[name] = [_pass(runs[name], _batches(n, batch, s, transform, device), keep=True)[1]
                       for s in (seed, seed + 1)]
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds, _ = _pass(runs[name], _batches(n, batch, seed, transform, device), keep=False)
            samples[name].append(seconds)
            progress(f"[{key}] round {r + 1}/{rounds} {name}: {n / seconds:.2f} features/s ({seconds:.2f} s)")

    progress(f"[{key}] Fréchet distances ...")
    ref = np.concatenate(feats["eager"])
    ref_fid, method = fid_from_features(*feats["eager"])
    eager_s = statistics.median(samples["eager"])
    rows = []
    for name in contenders:
        got = np.concatenate(feats[name]).astype(np.float64)
        err = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
        fid = ref_fid if name == "eager" else fid_from_features(*feats[name])[0]
        seconds = statistics.median(samples[name])
        rows.append(FidRow(contender=name, seconds=seconds, features_per_s=n / seconds, speedup=eager_s / seconds,
                           max_rel_err=float(err.max()), fid=fid,
                           fid_rel_diff=abs(fid - ref_fid) / max(abs(ref_fid), 1e-30),
                           compile_s=compile_s.get(name), round_seconds=samples[name]))
    return FidTable(model=title, features=what, blocks=len(blocks), fused=fused, unfused=dict(unfused),
                    fid_method=method, rows=rows, conv_units=conv_units)


def fid_bench(n_images: int, batch: int = 50, weights: str | None = None, contenders: Sequence[str] = CONTENDERS,
              progress: Callable[[str], None] | None = None, rounds: int = 3, seed: int = 0,
              models: Sequence[str] = MODELS, device: str | torch.device = "cpu",
              convs: bool = True) -> FidBenchReport:
    """The FID workflow in float32 on `device` ("cpu", or "cuda" under PyTorch's own TF32
    flags, which the report records): pytorch-fid's InceptionV3 pool features and
    timm's inception_v3 logits, each contender against the original model in eager mode
    (module docstring). `weights` (a pytorch-fid state dict file) applies to pytorch-fid's
    model; timm's is random. `progress` gets one line per step and per contender per round.
    The swapped contenders are swap_inception(model, convs=convs): with True (the default)
    the stem's conv units are fused too, False swaps the Inception blocks only.
    Raises ValueError for bad counts, contenders, models, or a device that is not there."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device must be 'cpu' or an available CUDA device, got {str(device)!r}"
                         + ("" if device.type != "cuda" else " (this machine has no CUDA GPU)"))
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown or "eager" not in contenders:
        raise ValueError(f"contenders must include 'eager' and be among {CONTENDERS}, got {tuple(contenders)}")
    if [m for m in models if m not in MODELS] or not models:
        raise ValueError(f"models must be among {MODELS}, got {tuple(models)}")
    if n_images < 2 or batch < 1 or rounds < 1:
        raise ValueError(f"need n_images >= 2, batch >= 1 and rounds >= 1, got {n_images}, {batch}, {rounds}")
    progress = progress or (lambda message: None)
    tables = [_bench_model(key, n_images, batch, weights, contenders, rounds, seed, progress, device, convs)
              for key in models]
    machine = machine_info(str(device))
    if device.type == "cuda":  # they decide fp32's speed and error on either side
        machine["tf32"] = (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                           f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    return FidBenchReport(machine=machine, n_images=n_images, batch=batch, rounds=rounds, seed=seed,
                          weights=weights, tables=tables)
