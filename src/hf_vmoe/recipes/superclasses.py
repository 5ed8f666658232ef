"""Super-classes for Mobile V-MoE's super-class guided router.

Mobile V-MoE (Daxberger et al. 2023) trains the per-image router to predict a *super-class*: a group of classes
that a dense model confuses with each other. One super-class per expert, so each expert specialises in a group
of similar-looking classes. The recipe:

1. `model_confusion_matrix(dense_model, held_out_dataset)` (or `confusion_matrix(labels, predictions)` from any
   classifier's predictions);
2. `similarity_graph(cm)`: symmetric class-similarity weights (how often i and j are mistaken for each other,
   relative to how often each is seen);
3. `balanced_partition(similarity, num_experts)`: groups of near-equal size (sizes differ by at most one) that
   keep confusable classes together;
4. `set_superclasses(config, superclass_ids)`; the map is then saved with the model's config.

Users with known super-classes (CIFAR-100's 20 coarse classes, WordNet groups) skip 1-3 with
`load_superclass_map(path, class_names)`. `save_superclasses` writes JSON or CSV with the class names per group.

The partition is balanced spectral clustering from scipy's pieces: a spectral embedding of the normalised graph
Laplacian, k-means++ seeding, then a minimum-cost matching of classes to group seats (`linear_sum_assignment`)
alternated with centroid updates, best of several seeds, refined by swaps of two classes between groups that
raise the within-group similarity. The matching makes balance a hard constraint for any E
(docs/mobile-vmoe-recipe.md says why not Kernighan-Lin, modularity communities or METIS).

`superclasses_from_model` also reports the dense model's held-out top-1 and how many classes it predicts and
confuses (`confusion_report`), and warns when the matrix is too sparse to partition (`CONFUSION_CHECKS`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Confusion matrix
# ----------------------------------------------------------------------------------------------------------------


def confusion_matrix(labels, predictions, num_labels: int | None = None) -> np.ndarray:
    """`cm[i, j]` = number of examples of true class i predicted as class j (int64, num_labels x num_labels)."""
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions differ in length: {labels.shape[0]} vs {predictions.shape[0]}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must be integer class ids, got dtype {values.dtype}")
        if values.size and values.min() < 0:
            raise ValueError(f"{name} must be >= 0, got {values.min()}")
    if num_labels is None:
        num_labels = int(max(labels.max(initial=-1), predictions.max(initial=-1))) + 1
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and values.max() >= num_labels:
            raise ValueError(f"{name} contain class {values.max()}, out of range for num_labels={num_labels}")
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def predict(model, dataset, batch_size: int = 64, collate_fn=None, device=None, progress: bool = False,
            return_probs: bool = False):
    """Run `model` (a classifier returning `.logits`) in eval mode over `dataset` (items with `pixel_values` and
    `labels`, e.g. a `datasets.Dataset` with a transform, or a list of dicts). Returns (labels, predictions) as
    int64 numpy arrays (and the softmax probabilities, float64, with `return_probs=True`). Routing at eval never
    looks at labels, so labels are not passed to the model."""
    import torch
    from torch.utils.data import DataLoader

    if collate_fn is None:
        def collate_fn(items):
            return {
                "pixel_values": torch.stack([torch.as_tensor(x["pixel_values"]) for x in items]),
                "labels": torch.as_tensor([int(x["labels"] if "labels" in x else x["label"]) for x in items]),
            }

    device = device or next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predicting", leave=False)
    was_training = model.training
    model.eval()
    all_labels, all_preds, all_probs = [], [], []
    try:
        with torch.no_grad():
            for batch in loader:
                logits = model(pixel_values=batch["pixel_values"].to(device)).logits.float()
                all_preds.append(logits.argmax(-1).cpu())
                all_labels.append(batch["labels"].cpu())
                if return_probs:
                    all_probs.append(logits.softmax(-1).cpu())
    finally:
        model.train(was_training)
    labels = torch.cat(all_labels).numpy().astype(np.int64)
    preds = torch.cat(all_preds).numpy().astype(np.int64)
    if return_probs:
        return labels, preds, torch.cat(all_probs).double().numpy()
    return labels, preds


def soft_confusion_matrix(labels, probs) -> np.ndarray:
    """`cm[i, j]` = summed predicted probability of class j over the examples of true class i. On small held-out
    sets of an accurate model the hard confusion matrix is almost diagonal; the soft one still says which classes
    the model finds similar."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (num_examples, num_labels) = ({labels.shape[0]}, C), got {probs.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    cm = np.zeros((probs.shape[1], probs.shape[1]))
    np.add.at(cm, labels, probs)
    return cm


def model_confusion_matrix(model, dataset, batch_size: int = 64, collate_fn=None, device=None,
                           progress: bool = False, soft: bool = False) -> np.ndarray:
    """Confusion matrix of `model` over `dataset` (use a held-out split, not the training set: a model that has
    memorised its training set confuses nothing there). `soft=True` sums predicted probabilities instead of
    counting argmax predictions (`soft_confusion_matrix`)."""
    if soft:
        labels, _, probs = predict(model, dataset, batch_size, collate_fn, device, progress, return_probs=True)
        return soft_confusion_matrix(labels, probs)
    labels, predictions = predict(model, dataset, batch_size, collate_fn, device, progress)
    return confusion_matrix(labels, predictions, model.config.num_labels)


# ----------------------------------------------------------------------------------------------------------------
# Similarity graph and balanced partition
# ----------------------------------------------------------------------------------------------------------------


def _check_square(matrix, name: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square (num_classes x num_classes) matrix, got shape {matrix.shape}")
    if matrix.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (matrix < 0).any():
        i, j = np.argwhere(matrix < 0)[0]
        raise ValueError(f"{name} must have non-negative entries, got {matrix[i, j]} at [{i}, {j}]")
    return matrix


def similarity_graph(cm, normalize: bool = True) -> np.ndarray:
    """Symmetric class-similarity matrix from a confusion matrix: `S[i, j] = (P[i, j] + P[j, i]) / 2` off the
    diagonal, 0 on it, with `P` the row-normalised confusion (the share of class i's examples predicted as j;
    `normalize=False` uses raw counts). Rows of classes with no examples stay 0."""
    cm = _check_square(cm, "confusion matrix")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    sim = (cm + cm.T) / 2
    np.fill_diagonal(sim, 0.0)
    return sim


def group_sizes(num_items: int, num_groups: int) -> list[int]:
    """Balanced sizes: `num_items % num_groups` groups of size ceil, the rest floor."""
    base, extra = divmod(num_items, num_groups)
    return [base + 1 if g < extra else base for g in range(num_groups)]


def within_group_similarity(similarity, assignment) -> float:
    """Sum of similarity over pairs of classes in the same group (each unordered pair once)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    assignment = np.asarray(assignment)
    same = assignment[:, None] == assignment[None, :]
    return float(np.triu(similarity * same, k=1).sum())


def _spectral_embedding(similarity: np.ndarray, dim: int) -> np.ndarray:
    from scipy.linalg import eigh

    n = similarity.shape[0]
    # a tiny uniform affinity keeps the graph connected (isolated classes) without moving separated blocks apart
    scale = similarity.sum() / max(n * (n - 1), 1)
    affinity = similarity + (1e-6 * scale if scale > 0 else 1e-6) * (1 - np.eye(n))
    degree = affinity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(degree)
    normalized = inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    # largest eigenvectors of D^-1/2 A D^-1/2 = smallest of the normalised Laplacian
    _, vectors = eigh(normalized, subset_by_index=[n - dim, n - 1])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)  # Ng-Jordan-Weiss row normalisation


def _balanced_assign(embedding: np.ndarray, centers: np.ndarray, sizes: list[int]) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    slots = np.repeat(np.arange(len(sizes)), sizes)  # one column per seat in a group
    cost = ((embedding[:, None, :] - centers[None, :, :]) ** 2).sum(-1)[:, slots]
    rows, cols = linear_sum_assignment(cost)
    assignment = np.empty(embedding.shape[0], dtype=np.int64)
    assignment[rows] = slots[cols]
    return assignment


def _refine_by_swaps(sim: np.ndarray, assignment: np.ndarray, num_groups: int) -> np.ndarray:
    """Swap two classes of different groups while a swap raises the within-group similarity, best swap first
    (Kernighan-Lin style moves; a swap keeps every group's size). Gain of swapping i (group a) and j (group b):
    `(S[i, b] - S[i, a]) + (S[j, a] - S[j, b]) - 2 S[i, j]`, with `S[i, g]` the similarity of i to group g."""
    assignment = assignment.copy()
    rows = np.arange(len(assignment))
    to_group = sim @ np.eye(num_groups)[assignment]  # (n, G): similarity of each class to each group
    tolerance = 1e-12 * max(sim.max(), 1e-300)
    for _ in range(len(assignment) ** 2):  # each swap raises the score, so the loop ends; the bound caps its time
        relative = to_group - to_group[rows, assignment][:, None]  # gain of moving i into group g, alone
        by_member = relative[:, assignment]  # [i, j]: gain of moving i into j's group
        gain = by_member + by_member.T - 2 * sim
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, j] <= tolerance:
            break
        a, b = assignment[i], assignment[j]
        to_group[:, a] += sim[:, j] - sim[:, i]
        to_group[:, b] += sim[:, i] - sim[:, j]
        assignment[i], assignment[j] = b, a
    return assignment


def balanced_partition(similarity, num_groups: int, seed: int = 0, n_init: int = 10, max_iter: int = 50) -> list[int]:
    """Partition classes into `num_groups` groups whose sizes differ by at most one, keeping similar (confusable)
    classes together. `similarity` is a symmetric non-negative (num_classes x num_classes) matrix, e.g. from
    `similarity_graph`. Returns `superclass_ids` (class -> group in [0, num_groups)); group ids are ordered by
    each group's smallest class id, so the result is deterministic for a given seed.

    Balanced k-means on the spectral embedding keeps blocks of classes confused among themselves together, but
    with more tightly confused pairs than the embedding has dimensions (e.g. 10 pairs into 2 groups) it can
    split a pair to meet the sizes. So the best of the `n_init` runs is refined by swaps: two classes of
    different groups trade places while that raises the within-group similarity (sizes stay as they are); a
    split pair whose partners could trade with another split pair is rejoined this way."""
    from scipy.cluster.vq import kmeans2

    sim = _check_square(similarity, "similarity")
    if not np.allclose(sim, sim.T):
        raise ValueError("similarity must be symmetric; build it with similarity_graph(confusion_matrix)")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    n = sim.shape[0]
    if num_groups > n:
        raise ValueError(f"cannot split {n} classes into num_groups={num_groups} non-empty groups (fewer classes "
                         "than experts); use fewer experts")
    sim = sim.copy()
    np.fill_diagonal(sim, 0.0)
    if num_groups == 1:
        return [0] * n
    if num_groups == n:
        return list(range(n))
    sizes = group_sizes(n, num_groups)
    embedding = _spectral_embedding(sim, num_groups)
    rng = np.random.default_rng(seed)
    best, best_score = None, -np.inf
    for _ in range(n_init):
        centers, _ = kmeans2(embedding, num_groups, minit="++", seed=rng)
        assignment = _balanced_assign(embedding, centers, sizes)
        for _ in range(max_iter):
            centers = np.stack([embedding[assignment == g].mean(axis=0) for g in range(num_groups)])
            new = _balanced_assign(embedding, centers, sizes)
            if np.array_equal(new, assignment):
                break
            assignment = new
        score = within_group_similarity(sim, assignment)
        if score > best_score + 1e-12:
            best, best_score = assignment, score
    return _canonical(_refine_by_swaps(sim, best, num_groups))


def _canonical(assignment) -> list[int]:
    """Relabel groups by first appearance so equal partitions give equal lists."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(g), len(mapping)) for g in assignment]


def superclasses_from_confusion(cm, num_experts: int, seed: int = 0, normalize: bool = True) -> list[int]:
    """Confusion matrix -> balanced super-classes (one per expert)."""
    return balanced_partition(similarity_graph(cm, normalize=normalize), num_experts, seed=seed)


# The file a run that holds out a share of its training images for the super-classes writes into its output folder
# (the share, seed and counts); super-class maps built from that model carry it as `heldout`, so that a MoE run
# given the map holds out the same images and trains on the same data as the dense model.
HELDOUT_SPLIT_FILE = "superclass_heldout.json"

# Thresholds of `confusion_report`, below which a confusion matrix is too sparse to partition meaningfully
# (docs/mobile-vmoe-recipe.md says why these values).
CONFUSION_CHECKS = {
    "min_top1": 0.2,  # held-out top-1 floor: below it most errors are guesses, not similarity ...
    "min_top1_over_chance": 2.0,  # ... and at least twice chance (1 / num_classes) when that is higher
    "min_predicted_share": 0.5,  # the model's argmax must name at least half of the classes
    "min_confused_share": 0.5,  # at least half of the classes must be confused with some other class
}


def confusion_report(cm, partitioned=None, checks: dict | None = None) -> dict:
    """How far a dense model's confusion matrix can be trusted to build super-classes from.

    `cm`: counts of the model's argmax predictions on the held-out images (true class x predicted class);
    `partitioned`: the matrix the partition uses when it is another one (the soft confusion matrix; default `cm`);
    `checks`: overrides of `CONFUSION_CHECKS`. Returns `num_images`, `num_classes`, `top1` (held-out accuracy),
    `classes_predicted` (classes the argmax ever names), `classes_confused` (classes with a confusion to or from
    another class in `partitioned`), `top1_floor`, and `problems`: each failed check in words (empty = fine).
    A class no other class is confused with has no edge in the similarity graph, so the partition places it
    only to balance the group sizes."""
    checks = {**CONFUSION_CHECKS, **(checks or {})}
    unknown = sorted(set(checks) - set(CONFUSION_CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known are {sorted(CONFUSION_CHECKS)}")
    cm = _check_square(cm, "confusion matrix")
    partitioned = cm if partitioned is None else _check_square(partitioned, "partitioned matrix")
    if partitioned.shape != cm.shape:
        raise ValueError(f"partitioned matrix has shape {partitioned.shape}, the confusion matrix {cm.shape}")
    n = cm.shape[0]
    total = cm.sum()
    top1 = float(np.trace(cm) / total) if total else 0.0
    predicted = int((cm.sum(axis=0) > 0).sum())
    off_diagonal = partitioned * (1 - np.eye(n))
    confused = int(((off_diagonal.sum(axis=0) + off_diagonal.sum(axis=1)) > 0).sum())
    floor = max(checks["min_top1"], checks["min_top1_over_chance"] / n)
    problems = []
    if top1 < floor:
        problems.append(f"held-out top-1 {top1:.1%} is below {floor:.1%}, so most of its errors are guesses")
    if predicted < checks["min_predicted_share"] * n:
        problems.append(f"the model predicts only {predicted} of {n} classes "
                        f"(fewer than {checks['min_predicted_share']:.0%})")
    if confused < checks["min_confused_share"] * n:
        problems.append(f"only {confused} of {n} classes are ever confused with another class "
                        f"(fewer than {checks['min_confused_share']:.0%}); the others are placed only to balance sizes")
    return {"num_images": int(round(total)), "num_classes": n, "top1": top1, "classes_predicted": predicted,
            "classes_confused": confused, "top1_floor": floor, "problems": problems}


def format_confusion_report(report: dict) -> str:
    """One line: the dense model's held-out top-1 and how many classes it predicts and confuses."""
    return (f"dense model on {report['num_images']} held-out images: top-1 {report['top1']:.1%}, predicts "
            f"{report['classes_predicted']} of {report['num_classes']} classes, "
            f"{report['classes_confused']} classes confused with another")


def log_confusion_report(report: dict) -> None:
    """Log the report (INFO) and, when a check failed, a WARNING that says what to do."""
    logger.info("super-classes: %s", format_confusion_report(report))
    if report["problems"]:
        logger.warning(
            "super-classes: the confusion matrix is too sparse to partition meaningfully: %s. Train the dense model "
            "longer, hold out more images (a larger held-out share or folder), or partition the soft confusion "
            "matrix (soft=True; `hf-vmoe superclasses from-model --soft`); thresholds in CONFUSION_CHECKS, "
            "docs/mobile-vmoe-recipe.md",
            "; ".join(report["problems"]))


def superclasses_from_model(model, dataset, num_experts: int, batch_size: int = 64, collate_fn=None,
                            seed: int = 0, progress: bool = False, soft: bool = False,
                            device=None) -> tuple[list[int], np.ndarray, dict]:
    """A trained (dense) classifier and a held-out dataset -> (superclass_ids, the confusion matrix partitioned,
    `confusion_report`). The report (held-out top-1, classes predicted and confused) is logged, with a warning when
    the matrix is too sparse to partition meaningfully. `soft=True` partitions the soft confusion matrix; the
    report's top-1 and predicted classes still come from the argmax."""
    if soft:
        labels, predictions, probs = predict(model, dataset, batch_size, collate_fn, device, progress,
                                             return_probs=True)
    else:
        labels, predictions = predict(model, dataset, batch_size, collate_fn, device, progress)
    hard = confusion_matrix(labels, predictions, model.config.num_labels)
    cm = soft_confusion_matrix(labels, probs) if soft else hard
    report = confusion_report(hard, cm)
    log_confusion_report(report)
    return superclasses_from_confusion(cm, num_experts, seed=seed), cm, report


def set_superclasses(config, superclass_ids: Sequence[int], train_routing: str | None = None):
    """Store a super-class map in a `VMoEConfig` (validated: one entry per label, ids in [0, num_experts))."""
    ids = [int(s) for s in superclass_ids]
    old = (config.superclass_ids, config.train_routing)
    config.superclass_ids = ids
    if train_routing is not None:
        config.train_routing = train_routing
    try:
        config.check_vmoe()
    except ValueError:
        config.superclass_ids, config.train_routing = old
        raise
    return config


# ----------------------------------------------------------------------------------------------------------------
# Given hierarchies: load / save
# ----------------------------------------------------------------------------------------------------------------


def _class_index(class_names: Sequence[str] | None, num_labels: int | None):
    if class_names is not None:
        names = [str(c) for c in class_names]
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class_names contains duplicates: {duplicates}")
        return names, {name: i for i, name in enumerate(names)}
    if num_labels is None:
        return None, None
    return [str(i) for i in range(num_labels)], {str(i): i for i in range(num_labels)}


def _resolve_class(key, index: dict | None, num_labels: int | None) -> int:
    key_str = str(key).strip()
    if index is not None and key_str in index:
        return index[key_str]
    try:
        cid = int(key_str)
    except ValueError:
        known = list(index)[:5] if index else []
        raise ValueError(f"unknown class {key_str!r} in the super-class map (known classes start {known})") from None
    if num_labels is not None and not 0 <= cid < num_labels:
        raise ValueError(f"class id {cid} in the super-class map is out of range for {num_labels} classes")
    return cid


def load_superclass_map(path, class_names: Sequence[str] | None = None, num_labels: int | None = None,
                        num_experts: int | None = None) -> list[int]:
    """Read a class -> super-class map and return `superclass_ids` (one entry per class, ids 0..S-1).

    Accepted files (classes by name, matched against `class_names`, or by integer id):
    * JSON `{"superclass_ids": [0, 3, ...]}` (what `save_superclasses` writes; its `groups` are ignored then);
    * JSON `{"groups": [["cat", "dog"], ["car", "truck"], ...]}` or a JSON list of such lists; groups may also be
      dicts with a `classes` list (again what `save_superclasses` writes);
    * JSON `{"cat": "animal", "car": "vehicle", ...}` (super-classes by name or id);
    * CSV with a header `class,superclass` (other columns ignored; `class_id`/`class_name` also accepted).
    Super-classes given by name are numbered in order of first appearance; integer ids are kept as they are.
    Every class must be mapped exactly once. With `num_experts`, the number of super-classes must not exceed it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"super-class file {path!r} does not exist")
    names, index = _class_index(class_names, num_labels)
    n = len(names) if names is not None else num_labels
    pairs: list[tuple[int, object]] = []
    if path.lower().endswith(".csv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            reader.fieldnames = fields
            preferred = ("class", "class_name", "class_id", "label") if class_names is not None else (
                "class", "class_id", "class_name", "label")
            class_col = next((c for c in preferred if c in fields), None)
            if class_col is None or "superclass" not in fields:
                raise ValueError(f"{path}: CSV needs a header with 'class' and 'superclass' columns, got {fields}")
            for row in reader:
                pairs.append((_resolve_class(row[class_col], index, n), row["superclass"].strip()))
    else:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
        if isinstance(data, dict) and "superclass_ids" in data:
            ids = data["superclass_ids"]
            pairs = [(c, int(s)) for c, s in enumerate(ids)]
            if n is not None and len(ids) != n:
                raise ValueError(f"{path}: superclass_ids has {len(ids)} entries but there are {n} classes")
        else:
            groups = data.get("groups") if isinstance(data, dict) and "groups" in data else data
            if isinstance(groups, list):
                for g, members in enumerate(groups):
                    if isinstance(members, dict):
                        members = members.get("classes", members.get("class_ids"))
                    if not isinstance(members, list):
                        raise ValueError(f"{path}: group {g} must be a list of classes, got {members!r}")
                    pairs += [(_resolve_class(c, index, n), g) for c in members]
            elif isinstance(groups, dict):
                pairs = [(_resolve_class(c, index, n), s) for c, s in groups.items()]
            else:
                raise ValueError(f"{path}: expected a JSON object or list, got {type(data).__name__}")
    return _pairs_to_ids(pairs, n, num_experts, path)


def _pairs_to_ids(pairs, n, num_experts, source) -> list[int]:
    if n is None:
        n = max(c for c, _ in pairs) + 1 if pairs else 0
    seen: dict[int, object] = {}
    for c, s in pairs:
        if c in seen:
            raise ValueError(f"{source}: class {c} is mapped twice")
        seen[c] = s
    missing = [c for c in range(n) if c not in seen]
    if missing:
        raise ValueError(f"{source}: {len(missing)} classes have no super-class, e.g. class {missing[0]}")
    values = [seen[c] for c in range(n)]
    if all(isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values):
        ids = [int(v) for v in values]
        if min(ids) < 0:
            raise ValueError(f"{source}: super-class ids must be >= 0, got {min(ids)}")
    else:
        order: dict[str, int] = {}
        ids = [order.setdefault(str(v), len(order)) for v in values]
    count = max(ids) + 1
    if num_experts is not None and count > num_experts:
        raise ValueError(f"{source}: {count} super-classes but num_experts={num_experts}; "
                         "set num_experts to the number of super-classes (one expert per super-class)")
    return ids


def superclass_groups(superclass_ids: Sequence[int], class_names: Sequence[str] | None = None) -> list[list]:
    """Group members (class names, or ids without names) per super-class."""
    ids = [int(s) for s in superclass_ids]
    if class_names is not None and len(class_names) != len(ids):
        raise ValueError(f"class_names has {len(class_names)} entries but superclass_ids has {len(ids)}")
    groups = [[] for _ in range(max(ids) + 1 if ids else 0)]
    for c, s in enumerate(ids):
        groups[s].append(class_names[c] if class_names is not None else c)
    return groups


def save_superclasses(path, superclass_ids: Sequence[int], class_names: Sequence[str] | None = None,
                      confusion: np.ndarray | None = None, info: dict | None = None) -> str:
    """Write the super-classes as JSON (`superclass_ids`, and per group its class ids and names; optionally the
    confusion matrix it came from, and `info`: more JSON fields, e.g. the `confusion_report` and the held-out
    split) or, for a `.csv` path, a `class_id,class_name,superclass` table (without `confusion` and `info`). Both
    read back with `load_superclass_map`."""
    path = os.fspath(path)
    ids = [int(s) for s in superclass_ids]
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(ids))]
    if len(names) != len(ids):
        raise ValueError(f"class_names has {len(names)} entries but superclass_ids has {len(ids)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class_id", "class_name", "superclass"])
            writer.writerows([c, names[c], s] for c, s in enumerate(ids))
        return path
    groups = [
        {"superclass": g, "class_ids": [c for c, s in enumerate(ids) if s == g],
         "classes": [names[c] for c, s in enumerate(ids) if s == g]}
        for g in range(max(ids) + 1 if ids else 0)
    ]
    data = {"num_superclasses": len(groups), "superclass_ids": ids, "groups": groups, **(info or {})}
    if confusion is not None:
        confusion = np.asarray(confusion)
        data["confusion_matrix"] = (confusion.astype(int) if np.issubdtype(confusion.dtype, np.integer)
                                    else confusion.round(4)).tolist()
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


__all__ = [
    "confusion_matrix",
    "predict",
    "model_confusion_matrix",
    "soft_confusion_matrix",
    "similarity_graph",
    "group_sizes",
    "within_group_similarity",
    "balanced_partition",
    "superclasses_from_confusion",
    "superclasses_from_model",
    "CONFUSION_CHECKS",
    "HELDOUT_SPLIT_FILE",
    "confusion_report",
    "format_confusion_report",
    "log_confusion_report",
    "set_superclasses",
    "load_superclass_map",
    "superclass_groups",
    "save_superclasses",
]
