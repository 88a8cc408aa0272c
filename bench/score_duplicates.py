"""Scores `deeprank duplicates --json` against a planted set's truth.tsv (original, copy, kind).

Two images are reported as duplicates when they are in one group. Precision: the share of reported
pairs whose images come from one original (any planted kind, flips included: a flipped copy grouped
with its original is not a false positive). Recall: the share of (original, copy) pairs reported,
over every kind but `flip` (a mirrored photo is another picture, not a duplicate), and per kind
(flips too). Prints one markdown table row (`--header`: the header rows first).
"""
import itertools
import json
import sys

args = [a for a in sys.argv[1:] if a != "--header"]
truth_path, found_path = args
source = {}
pairs_by_kind = {}
for line in open(truth_path).read().splitlines()[1:]:
    orig, copy, kind = line.split("\t")
    source[orig] = orig
    source[copy] = orig
    pairs_by_kind.setdefault(kind, []).append((orig, copy))
kinds = list(pairs_by_kind)
found = json.load(open(found_path))
group_of = {}
reported = correct = 0
for g in found["groups"]:
    paths = [m["path"] for m in g["members"]]
    for p in paths:
        group_of[p] = g["group"]
    for a, b in itertools.combinations(paths, 2):
        reported += 1
        correct += a in source and b in source and source[a] == source[b]


def recall(pairs):
    hit = sum(1 for a, b in pairs if a in group_of and group_of.get(a) == group_of.get(b))
    return hit / len(pairs) if pairs else float("nan")


counted = [p for k in kinds if k != "flip" for p in pairs_by_kind[k]]
if "--header" in sys.argv:
    names = ", ".join(k for k in kinds if k != "flip")
    print(f"| threshold | groups | reported pairs | precision | recall ({names}) | " + " | ".join(kinds) + " |")
    print("|---" * (5 + len(kinds)) + "|")
precision = correct / reported if reported else float("nan")
print(
    f"| {found['threshold']} | {len(found['groups'])} | {reported} | {precision:.3f} | {recall(counted):.3f} | "
    + " | ".join(f"{recall(pairs_by_kind[k]):.2f}" for k in kinds)
    + " |"
)
