"""Whitening: streaming activation statistics, ZCA / PCA transforms saved beside an SAE, two-pass extraction.

Whitening decorrelates activations before SAE training and analysis. It is a standalone, saved,
reusable transform (:class:`Whitener`), not folded invisibly into one SAE: the same statistics
serve several SAEs, analysis code can whiten / un-whiten explicitly, and SAELens's trainer can use
them through :meth:`Whitener.to_sae_lens` (its ``ActivationWhitening``).

Statistics (:class:`IncrementalWhitener`). Mean and covariance accumulate in float64 with
Welford's algorithm, batch-wise: each batch's ``(n, mean, M2)`` (``M2`` = centred sum of outer
products, one float64 ``x_c.T @ x_c`` matmul on the caller's device) is merged into the running
one with Chan et al.'s exact parallel formula. Memory is ``d x d`` whatever the token count;
shards, workers and ranks merge exactly (:meth:`IncrementalWhitener.merge`, ``all_reduce``).
Rejected: accumulating raw ``sum(x)`` and ``sum(x x^T)`` as SAELens's ``estimate_whitening`` does;
``E[xx^T] - mu mu^T`` cancels catastrophically when the mean is large against the spread (the
residual stream has a few huge-mean channels). Same matmul cost, so no reason not to centre.

Transforms. With ``C' = (1 - a) C + a (tr C / d) I`` (shrinkage ``a``) and ``C' = E diag(l) E^T``:
ZCA ``W = E diag(l + eps)^-1/2 E^T`` (stays closest to the original basis, so latents stay
comparable with unwhitened ones), PCA ``W = E diag(l + eps)^-1/2`` (columns by decreasing
variance, SAELens's choice). Row-vector convention: ``z = (x - mean) @ W`` and
``x = z @ W_rev + mean``. ``eps`` is absolute (added to the eigenvalues, as in SAELens); with
``eps = 0`` a singular covariance raises instead of producing infinities.

Files. ``Whitener.save(folder)`` writes ``whitening.safetensors`` (mean, transform,
reverse_transform, eigenvalues, n_samples; float64) and ``whitening.json`` (method, eps, d, hook,
spectrum summary), each atomically: the layout ``sae_core.saes`` reads beside an SAE. A ``.pt``
variant (``save_torch``) holds only tensors and plain scalars, loadable with ``weights_only=True``
(no pickled classes). Raw statistics save as ``whitening_stats.safetensors`` + ``.json`` so pass
one can be resumed or merged later.

Two-pass extraction of whitened chunks from text (:class:`ActivationExtractor`) lives in
:mod:`sae_core.whitening.extraction`; its names are also importable from here. Pass one can read
an existing activation run instead (:func:`statistics_from_run`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from sae_core.checks import safetensors_header
from sae_core.files import atomic_path, atomic_write_json, file_sha256, read_json
from sae_core.store import ActivationRun

logger = logging.getLogger(__name__)

WHITENING_FILENAME = "whitening.safetensors"
WHITENING_JSON = "whitening.json"
STATS_FILENAME = "whitening_stats.safetensors"
STATS_JSON = "whitening_stats.json"
WHITENED_RUN = "whitened"
METHODS = ("zca", "pca")
WHITENER_KEYS = ("mean", "transform", "reverse_transform", "n_samples")
FORMAT_VERSION = 1


def _check_width(x: Tensor, d: int, what: str) -> None:
    if x.shape[-1] != d:
        raise ValueError(f"{what} has last dimension {x.shape[-1]} but the statistics are for d={d}; "
                         "is it from another model or hook point?")


class IncrementalWhitener:
    """Streaming float64 mean and covariance (Welford / Chan), mergeable, on one device."""

    def __init__(self, d: int, device: str | torch.device = "cpu") -> None:
        if d <= 0:
            raise ValueError(f"d must be positive, got {d}")
        self.d, self.device = d, torch.device(device)
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(d, d, dtype=torch.float64, device=self.device)

    def _merge_moments(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        """Chan et al.: combine (n, mean, M2) with another partition's, exactly."""
        if n_b == 0:
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + torch.outer(delta, delta) * (self.n * n_b / total)
        self.mean += delta * (n_b / total)
        self.n = total

    @torch.no_grad()
    def update(self, x: Float[Tensor, "... d"], mask: Bool[Tensor, "..."] | None = None) -> int:
        """Add the rows of ``x`` (where ``mask`` is True); returns how many rows were added."""
        _check_width(x, self.d, "x")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the statistics live on {self.device}; "
                             "create the IncrementalWhitener on the activations' device")
        rows = x.reshape(-1, self.d)  # (rows, d)
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match x's leading shape {tuple(x.shape[:-1])}")
            rows = rows[mask.reshape(-1).to(self.device)]
        if rows.shape[0] == 0:
            return 0
        bad = ~torch.isfinite(rows).all(dim=-1)
        if bool(bad.any()):
            raise FloatingPointError(f"{int(bad.sum())} of {rows.shape[0]} rows hold NaN or inf (first: row "
                                     f"{int(bad.nonzero()[0])}); the statistics are unchanged. Find where the "
                                     "activations overflow (e.g. a float16 forward) and fix or drop those rows")
        rows = rows.to(torch.float64)
        mean_b = rows.mean(dim=0)
        centred = rows - mean_b  # (rows, d)
        self._merge_moments(rows.shape[0], mean_b, centred.T @ centred)
        return rows.shape[0]

    def merge(self, other: IncrementalWhitener) -> IncrementalWhitener:
        """Fold ``other``'s statistics into these (in place): the result is that of the union."""
        if other.d != self.d:
            raise ValueError(f"cannot merge statistics of width {other.d} into width {self.d}")
        if other.device != self.device:
            raise ValueError(f"cannot merge statistics on {other.device} into statistics on {self.device}")
        self._merge_moments(other.n, other.mean, other.m2)
        return self

    def all_reduce(self, group: Any = None) -> IncrementalWhitener:
        """Replace these statistics by those of every rank of ``group`` (torch.distributed).

        All-gathers (n, mean, M2) and merges them in rank order, so every rank ends with the same
        bits. Costs ``world_size x d x d`` float64 of memory for the gather.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        n = torch.tensor([self.n], dtype=torch.int64, device=self.device)
        ns = [torch.zeros_like(n) for _ in range(world)]
        means = [torch.zeros_like(self.mean) for _ in range(world)]
        m2s = [torch.zeros_like(self.m2) for _ in range(world)]
        dist.all_gather(ns, n, group=group)
        dist.all_gather(means, self.mean, group=group)
        dist.all_gather(m2s, self.m2, group=group)
        total = IncrementalWhitener(self.d, self.device)
        for n_r, mean_r, m2_r in zip(ns, means, m2s, strict=True):
            total._merge_moments(int(n_r.item()), mean_r, m2_r)
        self.n, self.mean, self.m2 = total.n, total.mean, total.m2
        return self

    def covariance(self, ddof: int = 1) -> Float[Tensor, "d d"]:
        """The covariance ``M2 / (n - ddof)`` in float64 (``ddof=1``: unbiased, as ``np.cov``)."""
        if self.n <= ddof:
            raise ValueError(f"the covariance needs more than {ddof} rows; only {self.n} were added")
        return self.m2 / (self.n - ddof)

    def to_whitener(self, method: str = "zca", eps: float = 1e-4, shrinkage: float = 0.0,
                    hook: str | None = None) -> Whitener:
        """The :class:`Whitener` of these statistics."""
        return Whitener.from_statistics(self.mean, self.covariance(), self.n, method, eps, shrinkage, hook)

    def save(self, folder: str | os.PathLike[str], **metadata: Any) -> Path:
        """Write ``whitening_stats.safetensors`` (n, mean, m2) and ``whitening_stats.json`` atomically."""
        folder = Path(folder)
        with atomic_path(folder / STATS_FILENAME) as tmp:
            save_file({"n": torch.tensor(self.n, dtype=torch.int64), "mean": self.mean.cpu().contiguous(),
                       "m2": self.m2.cpu().contiguous()}, str(tmp))
        atomic_write_json(folder / STATS_JSON, {"format_version": FORMAT_VERSION, "d": self.d, "n": self.n,
                                                "sha256": file_sha256(folder / STATS_FILENAME), **metadata})
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_d: int | None = None,
             device: str | torch.device = "cpu") -> IncrementalWhitener:
        """Statistics saved by :meth:`save` (a folder or the ``.safetensors`` file)."""
        path = Path(path)
        file = path / STATS_FILENAME if path.is_dir() else path
        tensors = _read_safetensors(file, ("n", "mean", "m2"), "IncrementalWhitener.save", device, STATS_JSON)
        d = tensors["mean"].shape[0]
        if tensors["mean"].ndim != 1 or tensors["m2"].shape != (d, d) or int(tensors["n"]) < 0:
            raise ValueError(f"{file}: mean {tuple(tensors['mean'].shape)}, m2 {tuple(tensors['m2'].shape)}, n "
                             f"{int(tensors['n'])} are not statistics of one width; {_FIX}")
        _check_expected_d(file, d, expected_d)
        stats = cls(d, device)
        stats.n, stats.mean, stats.m2 = int(tensors["n"]), tensors["mean"].double(), tensors["m2"].double()
        return stats


def _check_expected_d(path: Path, d: int, expected_d: int | None) -> None:
    if expected_d is not None and d != expected_d:
        raise ValueError(f"{path} holds whitening for d={d} activations but d={expected_d} was expected; "
                         "it belongs to another model or hook point")


_FIX = "restore the file, or compute the whitening again (scripts.compute_whitening)"


def _read_safetensors(file: Path, keys: Sequence[str], writer: str, device: str | torch.device,
                      json_name: str | None = None) -> dict[str, Tensor]:
    """Every tensor of ``file``, after checking its header, the hash its JSON records and finiteness."""
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist; write it with {writer}")
    safetensors_header(file, _FIX)
    record = file.parent / json_name if json_name else None
    if record is not None and record.exists():
        expected = read_json(record).get("sha256") if isinstance(read_json(record), dict) else None
        if expected is not None and file_sha256(file) != expected:
            raise ValueError(f"{file} differs from the SHA-256 recorded in {record} (damaged or replaced); {_FIX}")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as fh:
            missing = [k for k in keys if k not in fh.keys()]
            if missing:
                raise KeyError(f"{file} lacks the tensors {missing} (has {sorted(fh.keys())}); "
                               f"it was not written by {writer}")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except SafetensorError as err:
        raise ValueError(f"{file} cannot be read ({err}); {_FIX}") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{file}: {name} holds NaN or inf; {_FIX}")
    return tensors


def spectrum_summary(eigenvalues: Tensor, eps: float) -> dict[str, float | int]:
    """A JSON summary of a covariance spectrum (descending eigenvalues)."""
    lam = eigenvalues.double().cpu()
    total = float(lam.sum())
    return {"max": float(lam[0]), "min": float(lam[-1]), "median": float(lam.median()), "trace": total,
            "participation_ratio": total ** 2 / float((lam ** 2).sum()) if total > 0 else 0.0,
            "condition_number": float((lam[0] + eps) / (lam[-1] + eps)) if float(lam[-1]) + eps > 0 else math.inf,
            "n_below_eps": int((lam < eps).sum())}


@dataclass(frozen=True, eq=False)
class Whitener:
    """An affine whitening ``z = (x - mean) @ transform``, ``x = z @ reverse_transform + mean``."""

    mean: Float[Tensor, " d"]
    """Activation mean (float64)."""
    transform: Float[Tensor, "d d"]
    """Whitening matrix, right-multiplied (float64)."""
    reverse_transform: Float[Tensor, "d d"]
    """Its inverse, right-multiplied (float64)."""
    eigenvalues: Float[Tensor, " d"]
    """Eigenvalues of the (shrunk) covariance, descending, before ``eps``: the spectrum to plot."""
    n_samples: int
    """Rows the statistics were computed from."""
    method: str = "zca"
    """``zca`` or ``pca``."""
    eps: float = 1e-4
    """Regulariser added to every eigenvalue."""
    shrinkage: float = 0.0
    """Weight of the scaled identity the covariance was shrunk toward."""
    hook: str | None = None
    """Hook point the statistics come from (metadata)."""
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        d = self.mean.shape[0]
        for name in ("transform", "reverse_transform"):
            if getattr(self, name).shape != (d, d):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({d}, {d})")
        if self.method not in METHODS:
            raise ValueError(f"unknown whitening method {self.method!r}; use one of {METHODS}")

    @property
    def d(self) -> int:
        """Activation width."""
        return self.mean.shape[0]

    def __repr__(self) -> str:
        return (f"Whitener(method={self.method!r}, d={self.d}, n_samples={self.n_samples}, eps={self.eps}, "
                f"shrinkage={self.shrinkage}, hook={self.hook!r})")

    @classmethod
    def from_statistics(cls, mean: Tensor, covariance: Tensor, n_samples: int, method: str = "zca",
                        eps: float = 1e-4, shrinkage: float = 0.0, hook: str | None = None) -> Whitener:
        """ZCA or PCA whitening of a mean and covariance (computed in float64)."""
        if method not in METHODS:
            raise ValueError(f"unknown whitening method {method!r}; use one of {METHODS}")
        if eps < 0 or not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"need eps >= 0 and 0 <= shrinkage <= 1, got eps={eps}, shrinkage={shrinkage}")
        cov = covariance.double()
        cov = (cov + cov.T) / 2
        d = cov.shape[0]
        if shrinkage > 0:
            cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=cov.dtype,
                                                                                        device=cov.device)
        lam, vecs = torch.linalg.eigh(cov)
        lam, vecs = lam.flip(0).clamp(min=0), vecs.flip(1)  # descending; eigh's tiny negatives -> 0
        if eps == 0:
            tol = float(lam[0]) * d * torch.finfo(torch.float64).eps
            singular = int((lam <= tol).sum())
            if singular:
                raise ValueError(f"the covariance is singular ({singular} of {d} eigenvalues <= {tol:.3g}: "
                                 f"constant channels or fewer rows ({n_samples}) than dimensions); "
                                 "whitening with eps=0 would divide by zero, so set eps > 0 or shrinkage > 0")
        scale = (lam + eps).rsqrt()  # (d,)
        if method == "zca":
            transform, reverse = (vecs * scale) @ vecs.T, (vecs / scale) @ vecs.T
        else:
            transform, reverse = vecs * scale, (1 / scale)[:, None] * vecs.T
        return cls(mean.double().clone(), transform.contiguous(), reverse.contiguous(), lam, int(n_samples),
                   method, float(eps), float(shrinkage), hook)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
        """(mean, transform, reverse) in the compute dtype on x's device, cached per (device, dtype)."""
        compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        key = (x.device, compute)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device=x.device, dtype=compute)
                                     for t in (self.mean, self.transform, self.reverse_transform))
        return (*self._cache[key], compute)

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Whiten: ``(x - mean) @ transform``, any leading shape, in x's dtype and device.

        Half-precision inputs are computed in float32 and cast back.
        """
        _check_width(x, self.d, "x")
        mean, transform, _, compute = self._params(x)
        return ((x.to(compute) - mean) @ transform).to(x.dtype)

    __call__ = forward

    def reverse(self, z: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Un-whiten: ``z @ reverse_transform + mean``, any leading shape, in z's dtype and device."""
        _check_width(z, self.d, "z")
        mean, _, reverse, compute = self._params(z)
        return (z.to(compute) @ reverse + mean).to(z.dtype)

    def to_sae_lens(self) -> Any:
        """SAELens's ``ActivationWhitening`` with these statistics (for ``ActivationScaler(whitening=...)``)."""
        from sae_lens.training.activation_scaler import ActivationWhitening

        return ActivationWhitening(mean=self.mean, matrix=self.transform, inverse_matrix=self.reverse_transform)

    def summary(self) -> dict[str, Any]:
        """The JSON metadata written beside the tensors."""
        return {"format_version": FORMAT_VERSION, "method": self.method, "eps": self.eps,
                "shrinkage": self.shrinkage, "d": self.d, "n_samples": self.n_samples, "hook": self.hook,
                "eigenvalues": spectrum_summary(self.eigenvalues, self.eps)}

    def _tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "transform": self.transform, "reverse_transform": self.reverse_transform,
                "eigenvalues": self.eigenvalues, "n_samples": torch.tensor(self.n_samples, dtype=torch.int64)}

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``whitening.safetensors`` and ``whitening.json`` into ``folder``, each atomically."""
        folder = Path(folder)
        meta = {k: str(v) for k, v in self.summary().items() if k != "eigenvalues"}
        with atomic_path(folder / WHITENING_FILENAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self._tensors().items()}, str(tmp), metadata=meta)
        atomic_write_json(folder / WHITENING_JSON, {**self.summary(), "sha256": file_sha256(folder / WHITENING_FILENAME)})
        return folder

    def save_torch(self, path: str | os.PathLike[str]) -> Path:
        """Write a ``.pt`` file of tensors and plain scalars (loadable with ``weights_only=True``)."""
        record = {k: v.detach().cpu() for k, v in self._tensors().items() if k != "n_samples"}
        record.update(n_samples=self.n_samples, method=self.method, eps=self.eps, shrinkage=self.shrinkage,
                      hook=self.hook, format_version=FORMAT_VERSION)
        with atomic_path(path) as tmp:
            torch.save(record, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_d: int | None = None,
             device: str | torch.device = "cpu") -> Whitener:
        """Load a folder (``whitening.safetensors``), a ``.safetensors`` file or a ``.pt`` file."""
        path = Path(path)
        if path.suffix == ".pt":
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist; write it with Whitener.save_torch")
            try:
                record = torch.load(path, map_location=device, weights_only=True)
            except Exception as err:  # zip / pickle errors of a damaged file
                raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); {_FIX}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} holds {type(record).__name__}, not a Whitener record; {_FIX}")
            meta = {k: v for k, v in record.items() if not isinstance(v, Tensor)}
            tensors = {k: v for k, v in record.items() if isinstance(v, Tensor)}
        else:
            file = path / WHITENING_FILENAME if path.is_dir() else path
            tensors = _read_safetensors(file, (), "Whitener.save", device, WHITENING_JSON)
            with safe_open(str(file), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            if (file.parent / WHITENING_JSON).exists():
                meta.update(read_json(file.parent / WHITENING_JSON))
            meta.setdefault("n_samples", int(tensors["n_samples"]) if "n_samples" in tensors else None)
            path = file
        missing = [k for k in (*WHITENER_KEYS, "method", "eps") if k not in tensors and meta.get(k) is None]
        if missing:
            raise KeyError(f"{path} lacks {missing}; it was not written by Whitener.save / save_torch "
                           f"(needed: {list(WHITENER_KEYS)} plus method and eps)")
        d = tensors["mean"].shape[0]
        shapes = {k: tuple(tensors[k].shape) for k in ("mean", "transform", "reverse_transform")}
        if shapes != {"mean": (d,), "transform": (d, d), "reverse_transform": (d, d)} or \
                str(meta["method"]) not in METHODS or not math.isfinite(float(meta["eps"])):
            raise ValueError(f"{path} is not a consistent whitening (shapes {shapes}, method {meta['method']!r}, "
                             f"eps {meta['eps']!r}); {_FIX}")
        _check_expected_d(path, d, expected_d)
        if "eigenvalues" in tensors:
            lam = tensors["eigenvalues"].double()
        else:  # reverse^T reverse = E diag(l + eps) E^T for both methods
            rev = tensors["reverse_transform"].double()
            lam = (torch.linalg.eigvalsh(rev.T @ rev).flip(0) - float(meta["eps"])).clamp(min=0)
        hook = meta.get("hook")
        return cls(tensors["mean"].double(), tensors["transform"].double(), tensors["reverse_transform"].double(),
                   lam, int(meta["n_samples"]), str(meta["method"]), float(meta["eps"]),
                   float(meta.get("shrinkage", 0.0)), None if hook in (None, "None") else str(hook))


def statistics_from_run(run_dir: str | os.PathLike[str], hook: str | None = None,
                        device: str | torch.device = "cpu", allow_incomplete: bool = False) -> IncrementalWhitener:
    """Pass one over an existing activation run of ``sae_core.store`` (no model needed).

    An interrupted run is refused unless ``allow_incomplete`` (statistics of part of the texts).

    Reads the run shard by shard with ``ActivationRun.iter_shards`` (row shards and padded NPZ
    chunks alike hold only the rows the run's token policy kept), so memory stays one shard.
    """
    run = ActivationRun(run_dir)
    if not allow_incomplete:
        run.require_complete("whitening statistics")
    hook = hook or (run.hooks[0] if len(run.hooks) == 1 else None)
    if hook not in run.hooks:
        raise KeyError(f"run {run.run_id} has no hook {hook!r}; name one of {run.hooks}")
    if not run.shards:
        raise ValueError(f"{run.path} lists no complete shards; run the extraction first")
    stats: IncrementalWhitener | None = None
    for shard in tqdm(run.iter_shards(), total=len(run.shards), desc="shards", leave=False):
        x = shard.acts[hook].to(device)
        stats = stats or IncrementalWhitener(x.shape[-1], device)
        try:
            stats.update(x)
        except FloatingPointError as err:
            raise FloatingPointError(f"{hook} rows of shard {run.path / shard.record.file}: {err}") from None
    assert stats is not None
    return stats


__all__ = ["IncrementalWhitener", "Whitener", "spectrum_summary", "statistics_from_run"]
