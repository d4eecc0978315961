#!/usr/bin/env python3
"""The classic anchors on exactly the split `sift train` uses, so their
figures sit beside sift's in one run:

- TF-IDF (1,2)-grams + one-vs-rest linear SVM (scikit-learn's LinearSVC),
- fastText (word bigrams, 25 epochs, one-vs-all loss).

The split is sift's SplitPlan (training/src/dataset.rs): xxh3 of the
document's source (else its id) mod 100 below 10 is validation, below 15
tuning; of the rest, xxh3 of the id with seed 0x5eed mod 100 below 3 is
seen-source. Both anchors train on the training part only (the tuning part
is unused: neither has a hyperparameter chosen here) and are scored on the
validation and seen-source parts with sift's definitions of P@1, hit@5 and
recall@5.

Each anchor is run twice: on the title and text alone, and on the text
sift's models read (training/src/lib.rs, model_input): a `section …` line
and a `page …` line (the package name) before them, so the comparison with
sift is on the same information either way.

Usage: anchors.py DATA.jsonl [--json OUT.json] [--threads N]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import xxhash


def part(doc, validation=10, tuning=5, seen=3):
    group = doc.get("source") or doc["id"]
    bucket = xxhash.xxh3_64_intdigest(group.encode()) % 100
    if bucket < validation:
        return "validation"
    if bucket < validation + tuning:
        return "tuning"
    if xxhash.xxh3_64_intdigest(doc["id"].encode(), seed=0x5EED) % 100 < seen:
        return "seen"
    return "train"


FIELDS = False


def text(doc):
    """What the anchor reads: with FIELDS, sift's model input."""
    head = ""
    if FIELDS:
        for key, value in (("section", doc.get("section", "")), ("page", doc["id"])):
            if value.strip():
                head += key + " " + value.strip() + "\n"
    return head + doc.get("title", "") + "\n" + doc["text"]


def figures(ranked, docs):
    """ranked: per document, label names best first."""
    p1 = h5 = r5 = 0.0
    for top, doc in zip(ranked, docs):
        truth = set(doc["tags"])
        top = top[:5]
        p1 += top[0] in truth
        h5 += bool(truth & set(top))
        r5 += len(truth & set(top)) / len(truth)
    n = max(len(docs), 1)
    return {"documents": len(docs), "p_at_1": p1 / n, "hit_at_5": h5 / n, "recall_at_5": r5 / n}


def svm(train, parts, threads):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer
    from sklearn.svm import LinearSVC

    t0 = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, token_pattern=r"(?u)\b\w+\b")
    x = vec.fit_transform([text(d) for d in train])
    mlb = MultiLabelBinarizer()
    y = mlb.fit_transform([d["tags"] for d in train])
    clf = OneVsRestClassifier(LinearSVC(C=1.0), n_jobs=threads).fit(x, y)
    seconds = time.time() - t0
    out = {}
    for name, docs in parts.items():
        scores = clf.decision_function(vec.transform([text(d) for d in docs]))
        ranked = [[mlb.classes_[j] for j in np.argsort(-row)[:5]] for row in scores]
        out[name] = figures(ranked, docs)
    return out, seconds


def fasttext_anchor(train, parts, threads):
    import fasttext

    def line(doc):
        words = " ".join(text(doc).lower().split())
        return " ".join("__label__" + t for t in doc["tags"]) + " " + words

    t0 = time.time()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for d in train:
            if d["tags"]:
                f.write(line(d) + "\n")
        path = f.name
    model = fasttext.train_supervised(path, epoch=25, wordNgrams=2, loss="ova", thread=threads,
                                      verbose=0, seed=42)
    os.unlink(path)
    seconds = time.time() - t0
    out = {}
    for name, docs in parts.items():
        ranked = []
        for d in docs:
            labels, _ = model.predict(" ".join(text(d).lower().split()), k=5)
            ranked.append([l[len("__label__"):] for l in labels] or [""])
        out[name] = figures(ranked, docs)
    return out, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    docs = [json.loads(l) for l in open(args.data) if l.strip()]
    split = {"train": [], "tuning": [], "validation": [], "seen": []}
    for d in docs:
        split[part(d)].append(d)
    parts = {k: [d for d in split[k] if d["tags"]] for k in ("validation", "seen")}
    print(f"{len(split['train'])} training, {len(split['tuning'])} tuning, "
          f"{len(parts['validation'])} validation, {len(parts['seen'])} seen-source documents",
          file=sys.stderr)
    global FIELDS
    result = {}
    for fields in (False, True):
        FIELDS = fields
        for name, fn in [("svm", svm), ("fasttext", fasttext_anchor)]:
            key = name + ("_fields" if fields else "")
            figs, seconds = fn(split["train"], parts, args.threads)
            result[key] = {"seconds": seconds, **figs}
            v = figs["validation"]
            print(f"{key:<15} validation P@1 {v['p_at_1']:.4f} hit@5 {v['hit_at_5']:.4f} "
                  f"recall@5 {v['recall_at_5']:.4f}  (trained in {seconds:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
