"""Super-classes: confusion matrix -> balanced partition that keeps confusable classes together; map files."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config

from hf_vmoe import VMoEForImageClassification
from hf_vmoe.recipes.superclasses import (
    CONFUSION_CHECKS,
    balanced_partition,
    confusion_matrix,
    confusion_report,
    group_sizes,
    load_superclass_map,
    model_confusion_matrix,
    save_superclasses,
    set_superclasses,
    similarity_graph,
    soft_confusion_matrix,
    superclass_groups,
    superclasses_from_confusion,
    superclasses_from_model,
    within_group_similarity,
)


def planted_confusion(blocks, seed=0, noise=0):
    """Counts of confusion only within blocks (plus optional off-block noise); classes shuffled."""
    rng = np.random.default_rng(seed)
    blocks = np.asarray(blocks)
    n = len(blocks)
    same = blocks[:, None] == blocks[None, :]
    cm = np.where(same, rng.integers(1, 30, (n, n)), 0)
    if noise:
        cm = cm + (rng.random((n, n)) < 0.05) * rng.integers(0, noise + 1, (n, n))
    cm[np.arange(n), np.arange(n)] = 100
    return cm


def same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


@pytest.mark.parametrize("num_classes,num_groups,seed", [(12, 3, 0), (30, 6, 1), (40, 10, 2), (20, 4, 3), (10, 5, 4)])
def test_planted_blocks_are_recovered_exactly(num_classes, num_groups, seed):
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(np.arange(num_classes) % num_groups)
    ids = superclasses_from_confusion(planted_confusion(blocks, seed), num_groups)
    assert same_partition(ids, blocks)
    assert sorted(np.bincount(ids)) == sorted(np.bincount(blocks))


def test_planted_blocks_survive_sparse_noise():
    rng = np.random.default_rng(5)
    blocks = rng.permutation(np.arange(24) % 4)
    ids = superclasses_from_confusion(planted_confusion(blocks, 5, noise=2), 4)
    assert same_partition(ids, blocks)


def test_unequal_planted_blocks_are_recovered_with_sizes_differing_by_one():
    # 11 classes in blocks of 4, 4, 3: exactly the balanced sizes for 3 groups
    blocks = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    ids = superclasses_from_confusion(planted_confusion(blocks, 7), 3)
    assert same_partition(ids, blocks)


@pytest.mark.parametrize("num_classes,num_groups", [(11, 4), (13, 5), (200, 10), (7, 2), (10, 10), (9, 1)])
def test_groups_are_balanced(num_classes, num_groups):
    rng = np.random.default_rng(num_classes)
    cm = rng.integers(0, 5, (num_classes, num_classes))
    ids = superclasses_from_confusion(cm, num_groups)
    sizes = np.bincount(ids, minlength=num_groups)
    assert len(ids) == num_classes and set(ids) == set(range(num_groups))
    assert sizes.max() - sizes.min() <= 1
    assert sorted(sizes.tolist()) == sorted(group_sizes(num_classes, num_groups))


def planted_pairs(num_classes, seed):
    """Counts: shuffled pairs of classes strongly confused with each other (15-24 of 100 examples each way) over
    weak sparse background confusion (0-3 in 30% of the cells). Returns (cm, pairs)."""
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(num_classes).reshape(-1, 2)
    cm = rng.integers(0, 4, (num_classes, num_classes)) * (rng.random((num_classes, num_classes)) < 0.3)
    np.fill_diagonal(cm, 80)
    for a, b in pairs:
        cm[a, b] += rng.integers(15, 25)
        cm[b, a] += rng.integers(15, 25)
    return cm, pairs


# more pairs than groups and every group of even size, so all pairs fit (4 groups of 5 could not hold 10 pairs);
# without the swap refinement, spectral balanced k-means split two pairs in each of the first three cases
@pytest.mark.parametrize("num_classes,num_groups,seed", [(20, 2, 0), (20, 2, 1), (30, 3, 1), (24, 4, 2), (20, 5, 3)])
def test_most_confused_pairs_land_in_the_same_superclass(num_classes, num_groups, seed):
    cm, pairs = planted_pairs(num_classes, seed)
    ids = np.asarray(superclasses_from_confusion(cm, num_groups))
    split = [(int(a), int(b)) for a, b in pairs if ids[a] != ids[b]]
    assert split == []
    assert sorted(np.bincount(ids).tolist()) == group_sizes(num_classes, num_groups)


def test_partition_beats_random_balanced_partitions():
    rng = np.random.default_rng(0)
    blocks = rng.permutation(np.arange(20) % 4)
    sim = similarity_graph(planted_confusion(blocks, 0, noise=5))
    ids = balanced_partition(sim, 4)
    score = within_group_similarity(sim, ids)
    for _ in range(50):
        assert score >= within_group_similarity(sim, rng.permutation(ids))


def test_partition_is_deterministic():
    cm = np.random.default_rng(1).integers(0, 9, (15, 15))
    assert superclasses_from_confusion(cm, 4, seed=3) == superclasses_from_confusion(cm, 4, seed=3)


def test_similarity_graph_is_symmetric_row_normalised():
    cm = np.array([[8, 2, 0], [0, 1, 0], [0, 0, 0]])
    sim = similarity_graph(cm)
    np.testing.assert_allclose(sim, sim.T)
    assert sim[0, 1] == pytest.approx((2 / 10 + 0) / 2)
    assert np.all(np.diag(sim) == 0)
    assert sim[2].sum() == 0  # a class with no examples


def test_confusion_matrix_counts():
    cm = confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], num_labels=4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    soft = soft_confusion_matrix([0, 1], [[0.7, 0.3], [0.2, 0.8]])
    np.testing.assert_allclose(soft, [[0.7, 0.3], [0.2, 0.8]])


@pytest.mark.parametrize(
    "matrix,groups,match",
    [
        (np.ones((3, 4)), 2, "square"),
        (np.ones(5), 2, "square"),
        (np.array([[1, -1], [0, 1]]), 1, "non-negative"),
        (np.ones((3, 3)), 4, "fewer classes than experts"),
        (np.ones((3, 3)), 0, "num_groups"),
        (np.array([[1.0, np.nan], [0, 1]]), 1, "NaN"),
    ],
)
def test_invalid_inputs_raise(matrix, groups, match):
    with pytest.raises(ValueError, match=match):
        superclasses_from_confusion(matrix, groups)


def test_invalid_confusion_inputs_raise():
    with pytest.raises(ValueError, match="differ in length"):
        confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix([0, 5], [0, 1], num_labels=3)
    with pytest.raises(ValueError, match=">= 0"):
        confusion_matrix([0, -1], [0, 1])
    with pytest.raises(ValueError, match="symmetric"):
        balanced_partition(np.array([[0, 1.0], [0, 0]]), 2)


def test_model_confusion_matrix_matches_predictions():
    model = VMoEForImageClassification(tiny_config(moe_layers="none")).eval()
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 5} for i in range(12)]
    cm = model_confusion_matrix(model, data, batch_size=5)
    with torch.no_grad():
        preds = model(pixel_values=torch.stack([d["pixel_values"] for d in data])).logits.argmax(-1)
    expected = confusion_matrix([d["labels"] for d in data], preds.numpy(), 5)
    assert cm.shape == (5, 5) and (cm == expected).all() and cm.sum() == 12
    soft = model_confusion_matrix(model, data, soft=True)
    np.testing.assert_allclose(soft.sum(axis=1), np.bincount([d["labels"] for d in data], minlength=5))


class EchoClassifier(torch.nn.Module):
    """A stand-in classifier whose logits are its input: each example's `pixel_values` is the score vector."""

    def __init__(self, num_labels):
        super().__init__()
        self.config = SimpleNamespace(num_labels=num_labels)
        self.unused = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device from a parameter

    def forward(self, pixel_values):
        return SimpleNamespace(logits=pixel_values)


def examples(labels, predictions, num_labels):
    return [{"pixel_values": torch.nn.functional.one_hot(torch.tensor(p), num_labels).float(), "labels": int(y)}
            for y, p in zip(labels, predictions)]


def test_superclasses_from_model_reports_top1_and_predicted_classes(caplog):
    # 8 classes x 10 images; classes 2c and 2c+1 swap 3 of their 10 images: top-1 70%, every class predicted
    labels = np.repeat(np.arange(8), 10)
    predictions = np.where(np.tile(np.arange(10), 8) < 3, labels ^ 1, labels)
    with caplog.at_level(logging.INFO, logger="hf_vmoe.recipes.superclasses"):
        ids, cm, report = superclasses_from_model(EchoClassifier(8), examples(labels, predictions, 8), 4,
                                                  batch_size=16)
    assert report == {"num_images": 80, "num_classes": 8, "top1": pytest.approx(0.7), "classes_predicted": 8,
                      "classes_confused": 8, "top1_floor": pytest.approx(0.25), "problems": []}
    assert [ids[2 * c] == ids[2 * c + 1] for c in range(4)] == [True] * 4 and cm.sum() == 80
    assert "top-1 70.0%, predicts 8 of 8 classes" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_sparse_confusion_matrix_warns_with_what_to_do(caplog):
    # a collapsed model: it answers 0 or 1 for every image of 8 classes -> top-1 20%, 2 of 8 classes predicted
    labels = np.repeat(np.arange(8), 10)
    predictions = np.tile(np.arange(10), 8) % 2
    with caplog.at_level(logging.INFO, logger="hf_vmoe.recipes.superclasses"):
        _, _, report = superclasses_from_model(EchoClassifier(8), examples(labels, predictions, 8), 4)
    assert report["top1"] == pytest.approx(10 / 80) and report["classes_predicted"] == 2
    assert len(report["problems"]) == 2  # top-1 below the floor, too few classes predicted (all are confused)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "too sparse to partition" in warnings[0]
    assert "predicts only 2 of 8 classes" in warnings[0] and "12.5% is below 25.0%" in warnings[0]
    assert "train the dense model longer" in warnings[0].lower() and "hold out more images" in warnings[0]


def test_confusion_report_checks():
    # an accurate model on a small held-out split: a near-diagonal matrix with one confused pair of 10 classes
    cm = np.diag(np.full(10, 5))
    cm[0, 1] = 1
    report = confusion_report(cm)
    assert report["classes_predicted"] == 10 and report["classes_confused"] == 2
    assert report["problems"] == ["only 2 of 10 classes are ever confused with another class (fewer than 50%); "
                                  "the others are placed only to balance sizes"]
    soft = cm + 0.01  # the soft confusion matrix confuses every class a little
    assert confusion_report(cm, partitioned=soft)["problems"] == []
    assert confusion_report(cm, checks={"min_confused_share": 0.1})["problems"] == []
    assert CONFUSION_CHECKS["min_top1"] == 0.2  # the floor docs/mobile-vmoe-recipe.md states
    with pytest.raises(ValueError, match="min_acc"):
        confusion_report(cm, checks={"min_acc": 0.5})
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        confusion_report(cm, partitioned=np.ones((3, 3)))


NAMES = ["cat", "dog", "car", "truck", "apple"]


def test_save_and_load_roundtrip_json_and_csv(tmp_path):
    ids = [0, 0, 1, 1, 2]
    cm = np.eye(5, dtype=int)
    json_path = save_superclasses(tmp_path / "s.json", ids, NAMES, confusion=cm)
    data = json.loads(open(json_path).read())
    assert data["groups"][1]["classes"] == ["car", "truck"] and data["num_superclasses"] == 3
    assert load_superclass_map(json_path, class_names=NAMES) == ids
    csv_path = save_superclasses(tmp_path / "s.csv", ids, NAMES)
    assert load_superclass_map(csv_path, class_names=NAMES) == ids
    assert load_superclass_map(csv_path, num_labels=5) == ids  # by class id
    assert superclass_groups(ids, NAMES) == [["cat", "dog"], ["car", "truck"], ["apple"]]


def test_load_given_hierarchies(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({"cat": "animal", "dog": "animal", "car": "vehicle",
                                                     "truck": "vehicle", "apple": "food"}))
    assert load_superclass_map(tmp_path / "names.json", class_names=NAMES) == [0, 0, 1, 1, 2]
    (tmp_path / "groups.json").write_text(json.dumps([["apple"], ["dog", "cat"], ["truck", "car"]]))
    assert load_superclass_map(tmp_path / "groups.json", class_names=NAMES) == [1, 1, 2, 2, 0]
    (tmp_path / "coarse.csv").write_text("class,superclass\n0,3\n1,3\n2,1\n3,1\n4,0\n")
    assert load_superclass_map(tmp_path / "coarse.csv", num_labels=5) == [3, 3, 1, 1, 0]
    with pytest.raises(ValueError, match="num_experts=2"):
        load_superclass_map(tmp_path / "coarse.csv", num_labels=5, num_experts=2)


def test_load_errors(tmp_path):
    (tmp_path / "missing.json").write_text(json.dumps({"cat": 0, "dog": 0}))
    with pytest.raises(ValueError, match="no super-class"):
        load_superclass_map(tmp_path / "missing.json", class_names=NAMES)
    (tmp_path / "unknown.json").write_text(json.dumps({"cat": 0, "dog": 0, "car": 1, "truck": 1, "pear": 2}))
    with pytest.raises(ValueError, match="pear"):
        load_superclass_map(tmp_path / "unknown.json", class_names=NAMES)
    (tmp_path / "twice.json").write_text(json.dumps([["cat", "dog"], ["cat", "car", "truck", "apple"]]))
    with pytest.raises(ValueError, match="twice"):
        load_superclass_map(tmp_path / "twice.json", class_names=NAMES)
    (tmp_path / "bad.csv").write_text("name,group\ncat,1\n")
    with pytest.raises(ValueError, match="'class' and 'superclass'"):
        load_superclass_map(tmp_path / "bad.csv", class_names=NAMES)
    with pytest.raises(ValueError, match="does not exist"):
        load_superclass_map(tmp_path / "nope.json", class_names=NAMES)


def test_superclasses_are_saved_with_the_model(tmp_path):
    config = tiny_config(num_experts=3)
    set_superclasses(config, [0, 0, 1, 1, 2], train_routing="superclass")
    VMoEForImageClassification(config).save_pretrained(tmp_path)
    reloaded = VMoEForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.superclass_ids == [0, 0, 1, 1, 2]
    assert reloaded.config.train_routing == "superclass"
    with pytest.raises(ValueError, match="superclass_ids"):
        set_superclasses(config, [0, 1, 5, 1, 2])
    assert config.superclass_ids == [0, 0, 1, 1, 2]  # unchanged after a failed update
