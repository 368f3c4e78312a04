"""Linear classifiers on z_sem, the hyperplane distance, its calibration to grades, and latent edits
(Atad et al. 2024, sec. 3.2-3.3).

Normalisation (as the public code does): every z_sem is standardised by the mean mu and standard deviation
sigma of the grader's training codes, w = (z - mu) / sigma; the classifiers live in w space and every edit
is made there and mapped back, z' = mu + sigma w'.

For a classifier with normal n and bias b (decision function f(w) = n.w + b):

    signed distance        d(w)  = (n.w + b) / |n|                                          (eq. 3)
    binary counterfactual  w_ce  = w - 2 d(w) n / |n|           (reflection: d(w_ce) = -d(w))  (eq. 4)
    move to a distance     w'    = w + (d* - d(w)) n / |n|      (then d(w') = d*)
    grade calibration      g(d)  = sum_k c_k d^k                (polynomial least squares, degree 1 default)
    grade counterfactual   d*    = g^{-1}(target grade)         (degree 1: d* = (g - c_0) / c_1)
    predicted grade        g(d) (continuous) and clip(round(g(d)), lowest, highest grade)
    class probability      sigmoid(A d + B)   (logistic regression: A = |n|, B = 0, i.e. its own
                                               probability; SVM: Platt scaling fitted on its training d)

The grader is stored as two registry artifacts, never pickled: ``weights`` (safetensors: mu, sigma, and per
classifier normal, bias, calibration and Platt coefficients) and ``grader`` (JSON: label rules, grade
range, training counts), registered with ``parent`` = its autoencoder.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medcfx.errors import MedcfxError, UsageError

from medcfx_diffae.model import GRADER_METHOD, METHOD

CLASSIFIERS = ("svm", "logreg")


# ---------------------------------------------------------------------------------------------------------
# the linear model in normalised latent space


@dataclass
class Hyperplane:
    """One linear classifier in normalised z space with its grade calibration and Platt scaling."""

    normal: np.ndarray  # [D] float64
    bias: float
    calibration: np.ndarray  # polynomial coefficients, highest power first (numpy.polyval order)
    platt: tuple[float, float]  # (A, B): P(positive) = sigmoid(A d + B)

    @property
    def unit(self) -> np.ndarray:
        return self.normal / np.linalg.norm(self.normal)

    def distance(self, w: np.ndarray) -> np.ndarray:
        """Signed distance (n.w + b) / |n| of rows of w [N, D] (or one w [D])."""
        return (np.asarray(w, np.float64) @ self.normal + self.bias) / np.linalg.norm(self.normal)

    def grade(self, d) -> np.ndarray:
        return np.polyval(self.calibration, np.asarray(d, np.float64))

    def probability(self, d) -> np.ndarray:
        a, b = self.platt
        return 1.0 / (1.0 + np.exp(-(a * np.asarray(d, np.float64) + b)))

    def distance_for_grade(self, g: float) -> float:
        """The distance whose calibrated grade is g: the inverse of the calibration polynomial.

        Degree 1: (g - c_0) / c_1. Higher degrees: the real root of g(d) = target nearest to the inverse of
        the straight line through the polynomial's values at d = -1 and d = 1 (a monotone stand-in), so
        that neighbouring grades pick neighbouring roots.
        """
        c = np.asarray(self.calibration, np.float64)
        if len(c) == 2:
            if c[0] == 0:
                raise MedcfxError("the grade calibration is flat (slope 0): cannot invert it")
            return float((g - c[1]) / c[0])
        p = c.copy()
        p[-1] -= g
        roots = np.roots(p)
        real = roots[np.abs(roots.imag) < 1e-9].real
        if real.size == 0:
            raise MedcfxError(f"grade {g:g} is outside the range of the degree-{len(c) - 1} calibration")
        lo, hi = np.polyval(c, -1.0), np.polyval(c, 1.0)
        guess = -1.0 + 2.0 * (g - lo) / (hi - lo) if hi != lo else 0.0
        return float(real[np.argmin(np.abs(real - guess))])


@dataclass
class Grader:
    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    planes: dict[str, Hyperplane]
    info: dict = field(default_factory=dict)  # label rules, grade range, default classifier, counts

    # -- latent algebra ---------------------------------------------------------------------------------
    def normalise(self, z) -> np.ndarray:
        return (np.asarray(z, np.float64) - self.mean) / self.std

    def denormalise(self, w) -> np.ndarray:
        return np.asarray(w, np.float64) * self.std + self.mean

    def plane(self, classifier: str | None) -> Hyperplane:
        name = classifier or self.info.get("classifier", "svm")
        if name not in self.planes:
            raise UsageError(f"unknown classifier '{name}' (this grader has: {', '.join(self.planes)})")
        return self.planes[name]

    @property
    def grade_range(self) -> tuple[int, int]:
        lo, hi = self.info.get("grade_range", [0, 3])
        return int(lo), int(hi)

    def predict(self, z, classifier: str | None = None) -> dict:
        """Distance, class probability, continuous and rounded grade of codes z [N, D]."""
        p = self.plane(classifier)
        d = p.distance(self.normalise(z))
        g = p.grade(d)
        lo, hi = self.grade_range
        return {"distance": d, "probability": p.probability(d), "grade": g,
                "grade_rounded": np.clip(np.round(g), lo, hi).astype(int)}

    def move(self, z, target_distance, classifier: str | None = None) -> np.ndarray:
        """z' (de-normalised) whose normalised code is w + (d* - d(w)) n/|n|; target_distance [N] or scalar."""
        p = self.plane(classifier)
        w = self.normalise(z)
        d = p.distance(w)
        step = np.asarray(target_distance, np.float64) - d
        return self.denormalise(w + np.multiply.outer(step, p.unit))

    def reflect(self, z, classifier: str | None = None) -> np.ndarray:
        """Binary counterfactual: w_ce = w - 2 d(w) n/|n| (de-normalised)."""
        p = self.plane(classifier)
        w = self.normalise(z)
        d = p.distance(w)
        return self.denormalise(w - 2.0 * np.multiply.outer(d, p.unit))

    def to_grade(self, z, grade: float, classifier: str | None = None) -> np.ndarray:
        """Codes moved along n to the distance whose calibrated grade is ``grade``."""
        return self.move(z, self.plane(classifier).distance_for_grade(float(grade)), classifier)

    # -- storage ----------------------------------------------------------------------------------------
    def tensors(self) -> dict:
        import torch

        out = {"mean": torch.from_numpy(self.mean.astype(np.float64)),
               "std": torch.from_numpy(self.std.astype(np.float64))}
        for name, p in self.planes.items():
            out[f"{name}.normal"] = torch.from_numpy(np.asarray(p.normal, np.float64))
            out[f"{name}.bias"] = torch.tensor([float(p.bias)], dtype=torch.float64)
            out[f"{name}.calibration"] = torch.from_numpy(np.asarray(p.calibration, np.float64))
            out[f"{name}.platt"] = torch.tensor([float(p.platt[0]), float(p.platt[1])], dtype=torch.float64)
        return out

    def save(self, folder: Path) -> dict[str, Path]:
        """Write ``grader.safetensors`` and ``grader.json`` into ``folder``; returns {role: path}."""
        from safetensors.torch import save_file

        folder = Path(folder)
        weights = folder / "grader.safetensors"
        save_file({k: v.contiguous() for k, v in self.tensors().items()}, str(weights))
        meta = folder / "grader.json"
        meta.write_text(json.dumps({"format": "medcfx-diffae-grader", "version": 1,
                                    "classifiers": list(self.planes), **self.info}, indent=1))
        return {"weights": weights, "grader": meta}

    @classmethod
    def from_parts(cls, tensors: dict, info: dict, what: str = "grader") -> "Grader":
        def get(key):
            if key not in tensors:
                raise MedcfxError(f"{what}: the weights have no tensor '{key}'")
            return tensors[key].double().numpy()

        if info.get("format") != "medcfx-diffae-grader":
            raise MedcfxError(f"{what}: not a diffae grader (format {info.get('format')!r})")
        planes = {}
        for name in info.get("classifiers", []):
            platt = get(f"{name}.platt")
            planes[name] = Hyperplane(get(f"{name}.normal"), float(get(f"{name}.bias")[0]),
                                      get(f"{name}.calibration"), (float(platt[0]), float(platt[1])))
        if not planes:
            raise MedcfxError(f"{what}: holds no classifier")
        keep = {k: v for k, v in info.items() if k not in ("format", "version", "classifiers")}
        return cls(get("mean"), get("std"), planes, keep)


def load_grader(registry, ref) -> tuple[Grader, object]:
    """A grader entry -> (Grader, entry); both artifacts are sha256-verified by the registry."""
    entry = registry.resolve(ref)
    if entry.method != GRADER_METHOD:
        raise UsageError(f"model {entry.ref} is a '{entry.method}' model, not a grader ('{GRADER_METHOD}'); "
                         f"train one with `medcfx train {GRADER_METHOD} --model {entry.ref} --data LABELLED/`")
    if entry.parent is None:
        raise MedcfxError(f"grader {entry.ref} has no parent autoencoder")
    grader = Grader.from_parts(registry.load_tensors(entry, "weights"), registry.load_json(entry, "grader"),
                               f"grader {entry.ref}")
    return grader, entry


# ---------------------------------------------------------------------------------------------------------
# labels


def binary_targets(grades: np.ndarray, labels: np.ndarray | None, positive, negative,
                   ungraded_positive: bool) -> np.ndarray:
    """Binary target per row: 1, 0 or NaN (not used).

    A row with a grade is positive if its grade is in ``positive``, negative if in ``negative``, else not
    used (e.g. G1 with the paper's "G2-G3 vs G0" rule). A row without a grade uses its binary label: 0 is a
    negative (no finding means the lowest grade); 1 is a positive only when ``ungraded_positive`` (its grade
    is unknown, so it may belong to an excluded grade), else not used.
    """
    grades = np.asarray(grades, np.float64)
    out = np.full(len(grades), np.nan)
    pos = np.isin(grades, np.asarray(positive, np.float64))
    neg = np.isin(grades, np.asarray(negative, np.float64))
    out[pos] = 1.0
    out[neg] = 0.0
    if labels is not None:
        lab = np.asarray(labels, np.float64)
        ung = ~np.isfinite(grades)
        out[ung & (lab == 0)] = 0.0
        if ungraded_positive:
            out[ung & (lab == 1)] = 1.0
    return out


def label_column(ss, name: str) -> np.ndarray | None:
    """The binary label column ``name`` of a SliceSet ('' = its first label column; None if it has none)."""
    names = ss.label_names
    if not name:
        return ss.labels[:, 0] if names else None
    if name not in names:
        raise UsageError(f"unknown label column '{name}' (the data has: {', '.join(names) or 'none'})")
    return ss.labels[:, names.index(name)]


def _grades_list(values, what: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"grader.{what} must be a list of integer grades, got {values!r}") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# fitting


def fit_grader(z: np.ndarray, grades: np.ndarray, labels: np.ndarray | None, settings: dict,
               seed: int = 0) -> Grader:
    """Fit mu/sigma, a linear SVM and a logistic regression on the binary targets, and per classifier a
    polynomial calibration from the signed distance to the grade on the graded rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    z = np.asarray(z, np.float64)
    grades = np.asarray(grades, np.float64)
    positive = _grades_list(settings["positive_grades"], "positive_grades")
    negative = _grades_list(settings["negative_grades"], "negative_grades")
    if set(positive) & set(negative) or not positive or not negative:
        raise UsageError(f"grader.positive_grades {positive} and negative_grades {negative} must be non-empty "
                         f"and disjoint")
    degree = int(settings["degree"])
    if not 1 <= degree <= 5:
        raise UsageError(f"grader.degree must be in 1..5, got {degree}")
    y = binary_targets(grades, labels, positive, negative, bool(settings["ungraded_positive"]))
    used = np.isfinite(y)
    n_pos, n_neg = int(np.sum(y[used] == 1)), int(np.sum(y[used] == 0))
    if n_pos < 2 or n_neg < 2:
        raise MedcfxError(f"too few labelled samples for the classifiers: {n_pos} positive (grades {positive}) "
                          f"and {n_neg} negative (grades {negative}); at least 2 of each are needed")
    mean = z.mean(axis=0)
    std = np.maximum(z.std(axis=0), 1e-6)
    w = (z - mean) / std
    cal_grades = _grades_list(settings["calibration_grades"], "calibration_grades")
    graded = np.isfinite(grades)
    if cal_grades:
        graded &= np.isin(grades, cal_grades)
    if np.unique(grades[graded]).size < 2 or graded.sum() < degree + 1:
        raise MedcfxError(f"the grade calibration needs graded samples of at least 2 grades (and > degree "
                          f"{degree} samples); found {int(graded.sum())} of grades "
                          f"{sorted(set(grades[graded].astype(int).tolist()))}")
    cw = settings["class_weight"] or None
    if cw not in (None, "balanced"):
        raise UsageError(f"grader.class_weight must be 'balanced' or '', got {cw!r}")
    makers = {
        "svm": lambda C: LinearSVC(C=C, class_weight=cw, max_iter=20000, random_state=seed),
        "logreg": lambda C: LogisticRegression(C=C, class_weight=cw, max_iter=5000),
    }
    planes = {}
    counts = {}
    chosen = {}
    w_used, y_used = w[used], y[used].astype(int)
    for name, make in makers.items():
        C, table = choose_C(settings[f"{name}_C"], make, w_used, y_used, seed, f"grader.{name}_C")
        chosen[name] = {"C": C, "cv_auroc": table}
        clf = make(C).fit(w_used, y_used)
        normal = clf.coef_.reshape(-1).astype(np.float64)
        bias = float(np.asarray(clf.intercept_).reshape(-1)[0])
        if not np.linalg.norm(normal) > 0:
            raise MedcfxError(f"the {name} classifier has a zero normal vector (the classes are not separable "
                              f"at all in z_sem)")
        plane = Hyperplane(normal, bias, np.zeros(degree + 1), (1.0, 0.0))
        d = plane.distance(w)
        plane.calibration = np.polyfit(d[graded], grades[graded], degree)
        if name == "logreg":
            plane.platt = (float(np.linalg.norm(normal)), 0.0)
        else:
            platt = LogisticRegression(C=1e6, max_iter=5000).fit(d[used].reshape(-1, 1), y_used)
            plane.platt = (float(platt.coef_[0, 0]), float(platt.intercept_[0]))
        planes[name] = plane
        counts[name] = {"train_auroc": _auroc(y[used], d[used])}
    lo = int(min(np.nanmin(grades[graded]), min(negative)))
    hi = int(max(np.nanmax(grades[graded]), max(positive)))
    info = {
        "classifier": "svm",
        "grade_range": [lo, hi],
        "positive_grades": positive,
        "negative_grades": negative,
        "ungraded_positive": bool(settings["ungraded_positive"]),
        "label": settings["label"],
        "calibration_grades": cal_grades,
        "degree": degree,
        "normalisation": "w = (z - mean) / std over the grader's training codes; edits in w, z' = mean + std w'",
        "counts": {"images": int(len(z)), "positive": n_pos, "negative": n_neg, "graded": int(graded.sum())},
        "train": counts,
        "regularisation": chosen,
    }
    return Grader(mean, std, planes, info)


C_GRID = tuple(10.0 ** k for k in range(-4, 1))  # 1e-4 .. 1


def choose_C(setting, make, w: np.ndarray, y: np.ndarray, seed: int, what: str) -> tuple[float, list]:
    """The inverse regularisation strength C of a linear classifier: a number as given, or ``"cv"``:
    stratified k-fold (k = min(5, smallest class)) AUROC over ``C_GRID`` and the one-standard-error rule
    (the smallest C whose mean AUROC is within one standard error of the best mean; Hastie et al., ESL 7.10).

    Returns (C, [[C, mean AUROC, standard error], ...]) (the table is empty for a given number).
    Why not C = 1 always: on normalised z_sem a weakly regularised classifier leans on low-variance
    directions of the code that separate the labelled rows but that the decoder does not read, so moving a
    code along its normal leaves the decoded image unchanged (measured in docs/methods/diffae.md).
    """
    from sklearn.model_selection import StratifiedKFold

    if isinstance(setting, str) and setting.strip().lower() == "cv":
        k = int(min(5, np.bincount(y).min()))
        if k < 2:
            raise MedcfxError(f"{what}=cv needs at least 2 samples of each class")
        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(w, y))
        table = []
        for C in C_GRID:
            aucs = []
            for tr, te in folds:
                clf = make(C).fit(w[tr], y[tr])
                aucs.append(_auroc(y[te], clf.decision_function(w[te])))
            table.append([C, float(np.mean(aucs)), float(np.std(aucs, ddof=1) / math.sqrt(len(aucs)))])
        best = max(table, key=lambda r: r[1])
        C = min(r[0] for r in table if r[1] >= best[1] - best[2])
        return float(C), table
    try:
        C = float(setting)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a positive number or 'cv', got {setting!r}") from None
    if not (C > 0 and math.isfinite(C)):
        raise UsageError(f"{what} must be a positive number or 'cv', got {setting!r}")
    return C, []


def _auroc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else math.nan


class GraderTrainer:
    """``medcfx train diffae-grader --model AE --data labelled/``."""

    def train(self, request):
        import medcfx
        from medcfx.train import data_fingerprint

        from medcfx_diffae.model import load_autoencoder, semantic
        from medcfx_diffae.trainer import load_images

        ref = request.options.get("model") or ""
        if not ref:
            raise UsageError(f"train {GRADER_METHOD} needs --model AUTOENCODER (a '{METHOD}' model)")
        ae = load_autoencoder(request.registry, ref, request.device)
        settings = request.config["grader"]
        images, ss = load_images(request.data, ae.preprocess)
        if images.shape[1] != ae.model.channels:
            raise UsageError(f"--data {request.data}: images have {images.shape[1]} channel(s), {ae.entry.ref} "
                             f"expects {ae.model.channels}")
        request.log(f"encoding {len(images)} images with {ae.entry.ref}")
        z = semantic(ae.model, images.to(request.device)).cpu().numpy()
        labels = label_column(ss, settings["label"])
        grader = fit_grader(z, ss.grade, labels, settings, seed=request.seed)
        grader.info["autoencoder"] = ae.entry.ref
        with tempfile.TemporaryDirectory() as tmp:
            paths = grader.save(Path(tmp))
            provenance = {"data": str(request.data), "data_fingerprint": data_fingerprint(request.data),
                          "seed": request.seed, "medcfx_version": medcfx.__version__}
            metrics = {f"{k}_train_auroc": v["train_auroc"] for k, v in grader.info["train"].items()}
            metrics.update(grader.info["counts"])
            entry = request.registry.register(
                request.name or f"{ae.entry.name}-grader", GRADER_METHOD, paths,
                config={"grader": settings, "autoencoder": ae.entry.ref}, provenance=provenance,
                metrics=metrics, parent=ae.entry.ref)
        request.log(f"registered {entry.ref} (parent {ae.entry.ref})")
        return {"model": entry.ref, "parent": ae.entry.ref, **metrics}
