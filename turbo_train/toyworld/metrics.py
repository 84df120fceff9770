"""Scores for toy-world generations, computed from the judge's outputs.

- prompt adherence: per video, the fraction of the prompt's attribute slots (background, number of
  objects, and shape/color/motion of each object the prompt names; see
  `attributes.flatten_attributes`) that the judge recognises in the video; averaged over videos.
- per-attribute accuracy: per slot, the fraction of videos whose predicted value equals the truth
  (obj2.* over the videos whose truth has two objects).
- Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017, "GANs trained
  by a two time-scale update rule...", eq. 6): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).
- diversity: mean pairwise Euclidean distance between the judge features of the videos made for
  one prompt (different seeds), averaged over prompts. Mode collapse shows as a drop.
- paired fidelity: how closely a model reproduces a reference model's videos made from the same
  prompts and the same initial noise (e.g. SLA or a quantized bundle vs the dense teacher): PSNR of
  the pixels, and the Euclidean distance between the two videos' judge features, per pair, averaged.
  An approximation of the reference model (sparse attention, low-bit matmuls) that keeps the sampling
  trajectory scores high; the judge-based scores above can miss a drift that stays on the data manifold.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .attributes import flatten_attributes

# ----------------------------------------------------------------------------- attributes


def adherence_per_video(pred_attrs: Sequence[dict[str, Any]], prompt_attrs: Sequence[dict[str, Any]]) -> np.ndarray:
    """(N,) fraction of each prompt's slots that the prediction matches."""
    if len(pred_attrs) != len(prompt_attrs):
        raise ValueError(f"pred_attrs ({len(pred_attrs)}) and prompt_attrs ({len(prompt_attrs)}) must have the same length")
    scores = []
    for pred, prompt in zip(pred_attrs, prompt_attrs):
        p, want = flatten_attributes(pred), flatten_attributes(prompt)
        scores.append(sum(p.get(k) == v for k, v in want.items()) / len(want))
    return np.asarray(scores, dtype=np.float64)


def mean_stderr(x) -> float:
    """Standard error of the mean of per-item scores x (N,): std (ddof 1) / sqrt(N); 0 for N < 2.
    Over a fixed prompt set it says how much another draw of as many prompts would move the mean."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) >= 2 else 0.0


def paired_ratio_stderr(a, b) -> float:
    """Standard error of mean(a) / mean(b) for paired per-item scores (same prompts and noise, e.g. a
    student's and its teacher's per-video adherence), by the delta method: with r = mean(a) / mean(b),
    SE(r) = SE of the mean of (a - r·b), divided by mean(b). Pairing removes the prompts' shared
    difficulty, so it is far smaller than the two means' errors combined."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two (N,) arrays of one length, got {a.shape} and {b.shape}")
    mb = b.mean()
    if mb == 0:
        raise ValueError("paired_ratio_stderr: the denominator's mean is 0")
    return mean_stderr(a - (a.mean() / mb) * b) / abs(mb)


def prompt_adherence(pred_attrs: Sequence[dict[str, Any]], prompt_attrs: Sequence[dict[str, Any]]) -> float:
    """Mean over videos of the fraction of the prompt's attributes the judge recognises (1.0 = all)."""
    if len(pred_attrs) == 0:
        raise ValueError("prompt_adherence: no videos")
    return float(adherence_per_video(pred_attrs, prompt_attrs).mean())


def per_attribute_accuracy(pred_attrs: Sequence[dict[str, Any]], true_attrs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy per slot ("background", "num_objects", "obj1.shape", ..., "obj2.motion"), each over
    the videos whose truth has that slot."""
    if len(pred_attrs) != len(true_attrs) or len(pred_attrs) == 0:
        raise ValueError(f"pred_attrs ({len(pred_attrs)}) and true_attrs ({len(true_attrs)}) must be equal and non-empty")
    hits: dict[str, list[bool]] = {}
    for pred, true in zip(pred_attrs, true_attrs):
        p = flatten_attributes(pred)
        for k, v in flatten_attributes(true).items():
            hits.setdefault(k, []).append(p.get(k) == v)
    return {k: float(np.mean(v)) for k, v in hits.items()}


# ----------------------------------------------------------------------------- features


def _as_features(x, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_videos, feature_dim), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (eigenvalues rounded below zero clipped to 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (numpy or torch):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is taken as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues as S_a S_b: two symmetric
    eigendecompositions instead of a general matrix square root (scipy.linalg.sqrtm), so it is
    real by construction, also for singular covariances (N < D, collapsed features), and ~75x faster
    at D = 256 (0.02 vs 1.3 s), which the bootstraps below need. Returns a float >= 0.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dim, got {a.shape[1]} and {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs >= 2 videos per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(s_a)
    m = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean)
    return max(d, 0.0)  # rounding can leave -1e-12 for identical sets


def frechet_bootstrap_stderr(feats_a, feats_b, reps: int = 20, seed: int = 0) -> float:
    """Bootstrap standard error of `frechet_distance(feats_a, feats_b)`: the std over `reps` recomputations
    on both sets resampled with replacement (seeded). What another draw of as many videos would move the
    distance by (the evaluation's own noise; resampling biases each replicate up a little, not its
    spread much). reps < 2 -> 0."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if reps < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    vals = [frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
            for _ in range(reps)]
    return float(np.std(vals, ddof=1))


def frechet_ratio_paired_bootstrap(gen_a, gen_b, real, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    """(FD(a, real) / FD(b, real), its bootstrap standard error) for two models' features of the SAME
    prompts and noise (row i of gen_a and gen_b: one prompt) against one real set. Each resample draws
    prompt rows once for both models and real rows once for both distances, so what the two distances
    share (the prompts drawn, the real videos) moves them together and cancels in the ratio: the
    ratio's own noise, smaller than combining the two distances' separate errors."""
    a, b, r = (_as_features(x, n) for x, n in ((gen_a, "gen_a"), (gen_b, "gen_b"), (real, "real")))
    if a.shape != b.shape:
        raise ValueError(f"paired features must have one row per prompt in both, got {a.shape} and {b.shape}")
    ratio = frechet_distance(a, r) / frechet_distance(b, r)
    if reps < 2:
        return float(ratio), 0.0
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(reps):
        i, j = rng.integers(0, len(a), len(a)), rng.integers(0, len(r), len(r))
        vals.append(frechet_distance(a[i], r[j]) / frechet_distance(b[i], r[j]))
    return float(ratio), float(np.std(vals, ddof=1))


def diversity_per_prompt(features_by_prompt: Mapping[Any, Any] | Sequence[Any]) -> np.ndarray:
    """(P,) for each prompt the mean pairwise Euclidean distance between the (n_i, D) features of its
    videos (n_i >= 2 each). Accepts a dict prompt -> features or a list of arrays. Two models sampled with
    the same prompts and seeds give paired values (paired_ratio_stderr of their diversity ratio)."""
    groups = list(features_by_prompt.values()) if isinstance(features_by_prompt, Mapping) else list(features_by_prompt)
    if not groups:
        raise ValueError("diversity: no prompts")
    means = []
    for i, g in enumerate(groups):
        f = _as_features(g, f"features_by_prompt[{i}]")
        if len(f) < 2:
            raise ValueError(f"diversity needs >= 2 videos per prompt, prompt {i} has {len(f)}")
        d = np.sqrt(np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0.0))  # (n, n)
        iu = np.triu_indices(len(f), k=1)
        means.append(d[iu].mean())
    return np.asarray(means, dtype=np.float64)


def diversity(features_by_prompt: Mapping[Any, Any] | Sequence[Any]) -> float:
    """Mean over prompts of diversity_per_prompt: the mean pairwise judge-feature distance between the videos
    of one prompt."""
    return float(diversity_per_prompt(features_by_prompt).mean())


def paired_psnr(videos, reference, peak: float = 255.0, max_db: float = 100.0) -> np.ndarray:
    """(N,) PSNR in dB of each video against its reference (same shape, pixel values in [0, peak]);
    identical pairs get max_db instead of infinity."""
    a, b = np.asarray(videos, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"paired_psnr: videos {a.shape} and reference {b.shape} must have one equal shape (N, ...)")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(peak ** 2 / mse)
    return np.minimum(db, max_db)


def paired_feature_distance(feats, ref_feats) -> np.ndarray:
    """(N,) Euclidean distance between row i of feats and row i of ref_feats (judge features of a
    video and of its reference)."""
    a, b = _as_features(feats, "feats"), _as_features(ref_feats, "ref_feats")
    if a.shape != b.shape:
        raise ValueError(f"paired_feature_distance: feats {a.shape} and ref_feats {b.shape} differ")
    return np.sqrt(((a - b) ** 2).sum(1))
