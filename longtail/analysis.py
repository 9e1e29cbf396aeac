"""The EWB paper's evidence (Hasegawa & Sato, ICLR 2024) as numbers: how separable, how aligned and how large features
and classifier vectors are, and what weight decay does to BatchNorm scales.

All statistics are computed in float64 on penultimate features taken with the eval transform.
`track` is the cheap subset the engine logs every `train.track_every` epochs; `analyze_run` is
`longtail analyze RUN_DIR` (analysis.json plus figures, with MORE's logged diagnostics drawn when present).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from torch import nn

from longtail.checkpoint import atomic_write_json, read_jsonl, remove_stale_temporaries, run_lock
from longtail.inference import collect_features
from longtail.plots import by_size, class_ticks, new_figure, save_figure, shade_groups

# FDR's tolerance for a constant dimension, as a fraction of a mean (`fisher_details` says of which).
FLAT_DIM_RATIO = 1e-3


def _float64(features: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return features.detach().cpu().double().numpy(), labels.detach().cpu().long().numpy()


FDR_RULES = ("reference", "spread")


def _scatter(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S_w, S_b) over the classes present in `y`."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= counts[:, None]
    within = x - means[inverse]
    between = means - x.mean(axis=0)
    return within.T @ within, (between * counts[:, None]).T @ between


def fisher_details(features: torch.Tensor, labels: torch.Tensor, rule: str = "reference") -> dict:
    """FDR = tr(S_w^-1 S_b) over the classes present, and how it was computed.

    S_b = sum_k n_k (mu_k - mu)(mu_k - mu)^T, S_w = sum_k sum_{i in k} (x_i - mu_k)(x_i - mu_k)^T, float64.

    `rule="reference"` (the default) handles dimensions as EWB's reference code (`calc_fdr`) does:
    with t = 1e-3 x |mean of every entry of the feature matrix| (one scalar), drop dimension j when
    every sample lies within t of the first sample's value in j; then, with t recomputed on the kept
    dimensions, drop dimension j from S_w and S_b when the whole column j of S_w (equivalently row j:
    S_w is symmetric) lies within t of 0; then `numpy.linalg.solve(S_w, S_b)`, falling back to the
    pseudo-inverse when solve raises LinAlgError (an exactly singular S_w) or when S_w is singular by
    construction (more dimensions left than samples minus classes, where solve returns noise).
    `rule="spread"`: drop dimension j when its standard deviation is at most 1e-3 x |its own mean|,
    then always use the pseudo-inverse.

    Returns `fdr`, `solver` ("solve", "pinv_fallback", "pinv" for the spread rule, "none" when no
    dimension is left: FDR 0), `dims` (dimensions used) and `dims_total`.
    """
    if rule not in FDR_RULES:
        raise ValueError(f"FDR rule must be one of {', '.join(FDR_RULES)}, got {rule!r}")
    x, y = _float64(features, labels)
    dims_total = x.shape[1]
    if rule == "spread":
        x = x[:, x.std(axis=0) > FLAT_DIM_RATIO * np.abs(x.mean(axis=0))]
    else:
        tol = FLAT_DIM_RATIO * abs(x.mean()) if x.size else 0.0
        x = x[:, ~(np.abs(x - x[:1]) <= tol).all(axis=0)]
    if x.shape[1] == 0:
        return {"fdr": 0.0, "solver": "none", "dims": 0, "dims_total": dims_total}
    s_w, s_b = _scatter(x, y)
    if rule == "spread":
        fdr = np.trace(np.linalg.pinv(s_w, hermitian=True) @ s_b)
        return {"fdr": float(fdr), "solver": "pinv", "dims": x.shape[1], "dims_total": dims_total}
    used = ~(np.abs(s_w) <= FLAT_DIM_RATIO * abs(x.mean())).all(axis=0)
    s_w, s_b = s_w[used][:, used], s_b[used][:, used]
    if s_w.shape[0] == 0:
        return {"fdr": 0.0, "solver": "none", "dims": 0, "dims_total": dims_total}
    dims = int(used.sum())
    # S_w has rank at most N - C (samples minus classes): with more dimensions it is singular, but solve
    # rarely meets an exact zero pivot and returns rounding noise (~1e17) instead of raising.
    if dims <= len(y) - len(np.unique(y)):
        try:
            return {"fdr": float(np.trace(np.linalg.solve(s_w, s_b))), "solver": "solve", "dims": dims,
                    "dims_total": dims_total}
        except np.linalg.LinAlgError:
            pass
    fdr = np.trace(np.linalg.pinv(s_w, hermitian=True) @ s_b)
    return {"fdr": float(fdr), "solver": "pinv_fallback", "dims": dims, "dims_total": dims_total}


def fisher_ratio(features: torch.Tensor, labels: torch.Tensor, rule: str = "reference") -> float:
    """FDR = tr(S_w^-1 S_b) under `rule` ("reference" or "spread"); see `fisher_details`."""
    return fisher_details(features, labels, rule)["fdr"]


def cosine_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Mean cosine similarity over feature pairs i != j of the same class and of different classes
    (pooled over pairs), and the class x class matrix of mean cosines (diagonal: pairs i != j;
    NaN where a class has too few samples)."""
    x, y = _float64(features, labels)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)  # a zero feature has cosine 0 with anything
    n = np.bincount(y, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, u)
    self_dots = np.bincount(y, weights=(u * u).sum(axis=1), minlength=num_classes)  # sum_i ||u_i||^2 per class
    dots = sums @ sums.T  # [k, l] = sum over i in k, j in l of u_i . u_j
    same = np.diag(dots) - self_dots
    pairs = np.outer(n, n)
    np.fill_diagonal(pairs, n * (n - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(pairs > 0, (dots - np.diag(self_dots)) / pairs, np.nan)
    same_pairs = (n * (n - 1)).sum()
    diff_pairs = n.sum() ** 2 - (n * n).sum()
    diff_sum = dots.sum() - np.diag(dots).sum()
    return {
        "same": float(same.sum() / same_pairs) if same_pairs else math.nan,
        "different": float(diff_sum / diff_pairs) if diff_pairs else math.nan,
        "matrix": matrix,
    }


def class_feature_norms(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[Optional[float]]:
    """Mean ||f_i|| per class (None for a class with no samples)."""
    x, y = _float64(features, labels)
    n = np.bincount(y, minlength=num_classes)
    total = np.bincount(y, weights=np.linalg.norm(x, axis=1), minlength=num_classes)
    return [float(t / c) if c else None for t, c in zip(total, n)]


def classifier_norms(head: nn.Module) -> Optional[list[float]]:
    """||w_k|| of each class vector of a head with a K x d `weight` (ETF: its fixed norms); else None."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    return weight.detach().double().norm(dim=1).tolist()


def bn_gammas(model: nn.Module) -> dict:
    """Mean and std of BatchNorm scales per layer and over all of them together (None without BN)."""
    layers, everything = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            g = module.weight.detach().double().cpu()
            layers.append({"name": name, "mean": float(g.mean()), "std": float(g.std(unbiased=False)),
                           "numel": g.numel()})
            everything.append(g)
    if not everything:
        return {"layers": [], "mean": None, "std": None}
    g = torch.cat(everything)
    return {"layers": layers, "mean": float(g.mean()), "std": float(g.std(unbiased=False))}


def feature_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int, rule: str = "reference") -> dict:
    cos = cosine_stats(features, labels, num_classes)
    fdr = fisher_details(features, labels, rule)
    return {
        "fdr": fdr["fdr"],
        "fdr_solver": fdr["solver"],
        "fdr_dims": fdr["dims"],
        "cos_same": cos["same"],
        "cos_different": cos["different"],
        "cos_matrix": cos["matrix"],
        "feature_norms": class_feature_norms(features, labels, num_classes),
        "feature_norm_mean": float(features.double().norm(dim=1).mean()),
    }


def track(model: nn.Module, split: Any, device: torch.device, rule: str = "reference") -> dict:
    """Logged during training: FDR (with its solver), cosines and mean feature norm on `split`, BN gamma mean/std."""
    features, labels = collect_features(model, split, device, desc="track: train features")
    stats = feature_stats(features, labels, int(labels.max()) + 1, rule)
    gammas = bn_gammas(model)
    return {
        "fdr": stats["fdr"],
        "fdr_solver": stats["fdr_solver"],
        "cos_same": stats["cos_same"],
        "cos_different": stats["cos_different"],
        "feature_norm_mean": stats["feature_norm_mean"],
        "bn_gamma_mean": gammas["mean"],
        "bn_gamma_std": gammas["std"],
    }


def _jsonable(value: Any) -> Any:
    """NaN -> None (JSON has no NaN), arrays -> lists."""
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _epoch_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []  # a run killed mid-write leaves a torn last line


def tracked_history(run_dir: Path) -> list[dict]:
    """The `track` records of metrics.jsonl, one per tracked epoch."""
    return [{"epoch": r["epoch"], **r["track"]} for r in _epoch_records(run_dir) if "track" in r]


MORE_KEYS = ("more_discrepancy_per_class", "more_discrepancy", "more_layer_ratio")


def more_history(run_dir: Path) -> list[dict]:
    """MORE's diagnostics in metrics.jsonl (a MORE run with `train.track_every`), one per tracked epoch."""
    return [{"epoch": r["epoch"], **{k: r[k] for k in MORE_KEYS}} for r in _epoch_records(run_dir)
            if "more_layer_ratio" in r]


def plot_norms(result: dict, class_counts: list[int], path: Path, thresholds: Optional[Sequence[int]] = None,
               class_names: Optional[Sequence[str]] = None) -> str:
    """Per-class mean feature norm (train, test) and classifier row norm against class sorted by frequency,
    the Many / Medium / Few spans shaded when `thresholds` are given."""
    order = by_size(class_counts)
    fig = new_figure(7.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if thresholds is not None:
        shade_groups(top, order, class_counts, thresholds)
        shade_groups(bottom, order, class_counts, thresholds, named=False)
    for split, style in (("train", "-o"), ("test", "--s")):
        norms = result["splits"][split]["feature_norms"]
        values = [math.nan if norms[c] is None else norms[c] for c in order]
        top.plot(range(len(order)), values, style, ms=3, label=split)
    top.set_xlim(-0.5, len(order) - 0.5)
    top.set_ylabel("mean feature norm")
    top.legend(fontsize=8)
    fig.suptitle("Feature and classifier norms per class", fontsize=11)
    if result["classifier_norms"] is not None:
        bottom.plot(range(len(order)), [result["classifier_norms"][c] for c in order], "-o", ms=3, color="tab:red")
    bottom.set_ylabel("classifier row norm")
    bottom.set_xlabel("class (most training images first)")
    class_ticks(bottom, order, class_names)
    return save_figure(fig, path)


def plot_cosine_matrix(matrix: np.ndarray, class_counts: list[int], path: Path, title: str,
                       class_names: Optional[Sequence[str]] = None) -> str:
    order = by_size(class_counts)
    fig = new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    image = ax.imshow(matrix[order][:, order], cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="mean cosine similarity")
    class_ticks(ax, order, class_names, "x")
    class_ticks(ax, order, class_names, "y")
    ax.set_xlabel("class (most training images first)")
    ax.set_ylabel("class (most training images first)")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_tracking(history: list[dict], path: Path) -> str:
    epochs = [h["epoch"] for h in history]
    fig = new_figure(7.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(epochs, [h["fdr"] for h in history], "-o", ms=3)
    top.set_ylabel("FDR (train features)")
    top.set_title("Tracked during training")
    means = np.array([math.nan if h["bn_gamma_mean"] is None else h["bn_gamma_mean"] for h in history])
    stds = np.array([math.nan if h["bn_gamma_std"] is None else h["bn_gamma_std"] for h in history])
    bottom.plot(epochs, means, "-o", ms=3, label="mean")
    bottom.fill_between(epochs, means - stds, means + stds, alpha=0.3, label="± std")
    bottom.set_ylabel("BN gamma")
    bottom.set_xlabel("epoch")
    bottom.legend(fontsize=8)
    return save_figure(fig, path)


def plot_more_discrepancy(history: list[dict], class_counts: Sequence[int], path: Path,
                          thresholds: Optional[Sequence[int]] = None,
                          class_names: Optional[Sequence[str]] = None) -> str:
    """Per-class mean ||z_full - z_gen||^2 against training images per class (both axes log), at the first,
    middle and last tracked epochs: which classes the low-rank part changes, and how that evolves. Dotted
    lines: the Many / Few thresholds. A class without a positive value (log axis) is left out."""
    picked = [history[i] for i in sorted({0, len(history) // 2, len(history) - 1})]
    fig = new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    for k, h in enumerate(picked):
        per_class = h["more_discrepancy_per_class"]
        points = sorted((n, d) for n, d in zip(class_counts, per_class) if d is not None and d > 0)
        if points:
            ax.plot([n for n, _ in points], [d for _, d in points], "-o", ms=4, color=f"C{k}",
                    label=f"epoch {h['epoch']}")
    for t in thresholds or ():
        ax.axvline(t, color="grey", ls=":", lw=1)
    last = picked[-1]["more_discrepancy_per_class"]
    if class_names is not None and len(class_counts) <= 20:
        for n, d, name in zip(class_counts, last, class_names):
            if d is not None and d > 0:
                ax.annotate(str(name), (n, d), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("mean ||z_full - z_gen||² (train, eval mode)")
    ax.set_title("MORE: discrepancy against class frequency", fontsize=11)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_more_ratios(history: list[dict], path: Path) -> str:
    """||s B A||_F / ||W_g||_F of every decomposed layer over the tracked epochs, coloured by depth."""
    epochs = [h["epoch"] for h in history]
    layers = list(history[-1]["more_layer_ratio"])
    colours = colormaps["viridis"]
    fig = new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    for i, layer in enumerate(layers):
        ax.plot(epochs, [h["more_layer_ratio"].get(layer, math.nan) for h in history], "-", lw=1.2,
                color=colours(i / max(1, len(layers) - 1)), label=layer)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("||s B A||_F / ||W_g||_F")
    if len(layers) <= 12:
        ax.legend(fontsize=7, ncols=2)
        ax.set_title("MORE: low-rank share per layer", fontsize=11)
    else:  # dozens of names would hide the lines
        ax.set_title(f"MORE: low-rank share of {len(layers)} layers (dark: first {layers[0]}, "
                     f"yellow: last {layers[-1]})", fontsize=9)
    return save_figure(fig, path)


def analyze_run(run_dir: str | Path, data_root: Optional[str] = None, rule: str = "reference") -> dict:
    """`longtail analyze RUN_DIR`: statistics of the exported model on train and test features,
    written to RUN_DIR/analysis.json, with figures under RUN_DIR/figures/. `rule`: the FDR's
    dimension handling (`fisher_details`), recorded as `fdr_rule`; each split records `fdr_solver`."""
    if rule not in FDR_RULES:
        raise ValueError(f"FDR rule must be one of {', '.join(FDR_RULES)}, got {rule!r}")
    from longtail.rundir import model_file

    with run_lock(model_file(run_dir).parent):  # what it reads and what it writes belong to one model
        return _analyze_locked(run_dir, data_root, rule)


def _analyze_locked(run_dir: str | Path, data_root: Optional[str], rule: str) -> dict:
    from longtail.rundir import load_run
    from longtail.runtime import select_device
    from longtail.task import refuse_analysis

    run = load_run(run_dir, data_root)
    refuse_analysis(run.data, run.run_dir)
    device = select_device(run.cfg.train.device)
    model = run.model.to(device)
    counts = list(run.data.class_counts)
    results = run.results or {}
    result: dict = {
        "run_dir": str(run.run_dir),
        "checkpoint": results.get("checkpoint"),
        "posthoc": results.get("posthoc") and {k: results["posthoc"][k] for k in ("kind", "tau")},
        "class_counts": counts,
        "fdr_rule": rule,
        "splits": {},
        "bn_gamma": bn_gammas(model),
        "classifier_norms": classifier_norms(model.head),
        "tracked": tracked_history(run.run_dir),
    }
    for name, split in (("train", run.data.train), ("test", run.data.test)):
        features, labels = collect_features(model, split, device, run.cfg.eval.batch_size, f"features {name}")
        result["splits"][name] = feature_stats(features, labels, len(counts), rule)
    figures = run.run_dir / "figures"
    remove_stale_temporaries(figures)  # of a killed `analyze` or `eval --plots`
    names = run.data.class_names
    result["figures"] = [plot_norms(result, counts, figures / "norms.png", run.cfg.eval.thresholds or run.data.default_thresholds, names)]
    for name in ("train", "test"):
        matrix = result["splits"][name]["cos_matrix"]
        result["figures"].append(plot_cosine_matrix(matrix, counts, figures / f"cosine-{name}.png",
                                                    f"Class x class cosine ({name})", names))
    if result["tracked"]:
        result["figures"].append(plot_tracking(result["tracked"], figures / "tracking.png"))
    more = more_history(run.run_dir)
    if more:
        result["figures"] += [plot_more_discrepancy(more, counts, figures / "more_discrepancy.png",
                                                    run.cfg.eval.thresholds or run.data.default_thresholds, names),
                              plot_more_ratios(more, figures / "more_ratios.png")]
    result = _jsonable(result)
    atomic_write_json(run.run_dir / "analysis.json", result)
    for name in ("train", "test"):
        s = result["splits"][name]
        solver = "" if s["fdr_solver"] in ("solve", "pinv") else f" ({s['fdr_solver']})"
        print(f"{name}: FDR {s['fdr']:.3f}{solver}, cosine same {s['cos_same']:.3f} / different {s['cos_different']:.3f}, "
              f"mean feature norm {s['feature_norm_mean']:.3f}")
    if result["bn_gamma"]["mean"] is not None:
        print(f"BN gamma: mean {result['bn_gamma']['mean']:.4f}, std {result['bn_gamma']['std']:.4f}")
    if more:
        last = more[-1]
        groups = " / ".join("—" if v is None else f"{v:.3g}" for v in last["more_discrepancy"].values())
        ratios = last["more_layer_ratio"].values()
        print(f"MORE at epoch {last['epoch']}: discrepancy many / medium / few {groups}; ||s B A|| / ||W_g|| "
              f"{min(ratios):.3g} to {max(ratios):.3g} over {len(ratios)} layers")
    print(f"wrote {run.run_dir / 'analysis.json'} and {len(result['figures'])} figures in {figures}")
    return result
