"""Write the AutoICE metrics fixture: three small synthetic scenes and scikit-learn's scores.

The Rust metrics (``model/src/metrics.rs``) must reproduce scikit-learn exactly:

- SIC: ``r2_score(y_true, y_pred)`` on class indices 0-10;
- SOD, FLOE: ``f1_score(y_true, y_pred, average="weighted", zero_division=0)``;
- combined = (2 R2(SIC) + 2 F1(SOD) + F1(FLOE)) / 5 x 100.

Each chart is masked by its own reference 255 and the pixels of all scenes are pooled before one
score is computed. A prediction of 255 where the truth is valid ("no prediction") is passed to
scikit-learn as the label 255: a label with no support, so it only costs recall.

The inputs exercise: three scenes of different sizes; 255s in the truth that differ per task;
predicted classes that never occur in the truth (SIC 3, SOD 4, FLOE 5); truth classes that are
never predicted (SOD 5, FLOE 6); SIC predictions off by one or two classes; a few predictions of
255 where the SOD or FLOE truth is valid; arbitrary predictions (255 included) under ignored truth.

Re-run from the repository root (deterministic, ``np.random.default_rng(20240601)``):

    python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn numpy
    /tmp/skl/bin/python model/tests/reference/make_metrics_fixture.py

It writes ``model/tests/data/metrics_fixture.json`` (last written with scikit-learn 1.9.1 and
NumPy 2.4.6; both versions are recorded in the file). Charts are stored row-major, one character
per pixel: ``0``-``9`` for classes 0-9, ``a`` for class 10 and ``-`` for 255, so the fixture stays
small and readable.
"""
import json
import os

import numpy as np
import sklearn
from sklearn.metrics import confusion_matrix, f1_score, r2_score

IGNORE = 255
CLASSES = {"sic": 11, "sod": 6, "floe": 7}
# Classes that may occur in the truth of each task (the others are only ever predicted).
TRUTH_CLASSES = {
    "sic": [0, 1, 2, 4, 5, 6, 7, 8, 9, 10],  # 3 is only predicted
    "sod": [0, 1, 2, 3, 5],  # 4 is only predicted
    "floe": [0, 1, 2, 3, 4, 6],  # 5 is only predicted
}
# Truth classes that are never predicted: their predictions are moved to another class.
NEVER_PREDICTED = {"sod": (5, 3), "floe": (6, 5)}
SHAPES = [(40, 60), (48, 64), (45, 50)]
ALPHABET = "0123456789a"

rng = np.random.default_rng(20240601)


def blocky(h, w, cell, values, p=None):
    """A chart of polygon-like blocks: a coarse random grid upsampled (nearest) to h x w."""
    gh, gw = -(-h // cell), -(-w // cell)
    coarse = rng.choice(values, size=(gh, gw), p=p)
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:h, :w].astype(np.int64)


def ignore_mask(h, w, cell, fraction):
    """Blocks of ignored pixels covering about `fraction` of the chart."""
    return blocky(h, w, cell, [False, True], p=[1 - fraction, fraction]).astype(bool)


def make_scene(h, w):
    land = np.zeros((h, w), dtype=bool)
    r0, c0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    land[r0 : r0 + h // 4, c0 : c0 + w // 5] = True  # shared by all charts
    ignored = {
        "sic": land | ignore_mask(h, w, 9, 0.05),
        "sod": land | ignore_mask(h, w, 7, 0.15),
        "floe": land | ignore_mask(h, w, 6, 0.35),
    }
    truth, pred = {}, {}
    for task, n in CLASSES.items():
        t = blocky(h, w, int(rng.integers(5, 9)), TRUTH_CLASSES[task])
        if task == "sic":
            noise = rng.choice([-2, -1, 0, 1, 2], size=(h, w), p=[0.05, 0.15, 0.6, 0.15, 0.05])
            p = np.clip(t + noise, 0, n - 1)
            wrong = rng.random((h, w)) < 0.03
            p[wrong] = rng.integers(0, n, size=int(wrong.sum()))
        else:
            p = t.copy()
            flip = rng.random((h, w)) < (0.25 if task == "sod" else 0.3)
            p[flip] = rng.integers(0, n, size=int(flip.sum()))
            never, instead = NEVER_PREDICTED[task]
            p[p == never] = instead
            # "No prediction" at a few pixels whose truth is valid.
            valid = np.flatnonzero(~ignored[task])
            p.flat[rng.choice(valid, size=6, replace=False)] = IGNORE
        t[ignored[task]] = IGNORE
        # Anything may be predicted under ignored truth: it must not count.
        under = ignored[task]
        p[under] = rng.choice(list(range(n)) + [IGNORE], size=int(under.sum()))
        truth[task], pred[task] = t, p
    return truth, pred


def masked(truth, pred, task):
    t, p = truth[task].ravel(), pred[task].ravel()
    keep = t != IGNORE
    return t[keep], p[keep]


def scores(scenes):
    """scikit-learn's scores of the pooled, masked pixels of `scenes`."""
    pooled = {}
    for task in CLASSES:
        ts, ps = zip(*(masked(truth, pred, task) for truth, pred in scenes))
        pooled[task] = (np.concatenate(ts), np.concatenate(ps))
    sic_r2 = float(r2_score(*(a.astype(np.float64) for a in pooled["sic"])))
    sod_f1 = float(f1_score(*pooled["sod"], average="weighted", zero_division=0))
    floe_f1 = float(f1_score(*pooled["floe"], average="weighted", zero_division=0))
    out = {
        "sic_r2": sic_r2,
        "sod_f1": sod_f1,
        "floe_f1": floe_f1,
        "combined": (2 * sic_r2 + 2 * sod_f1 + floe_f1) / 5 * 100,
        "pixels": [int(pooled[task][0].size) for task in CLASSES],
    }
    for task in ("sod", "floe"):
        # Rows: true classes; columns: the classes, then 255 (no prediction).
        labels = list(range(CLASSES[task])) + [IGNORE]
        cm = confusion_matrix(*pooled[task], labels=labels)[: CLASSES[task]]
        out[f"{task}_confusion"] = cm.tolist()
    return out


def encode(chart):
    return "".join("-" if v == IGNORE else ALPHABET[v] for v in chart.ravel())


def main():
    scenes = [make_scene(h, w) for h, w in SHAPES]
    # The properties the fixture is meant to cover, checked on the pooled pixels.
    for task in ("sod", "floe"):
        t = np.concatenate([masked(tr, pr, task)[0] for tr, pr in scenes])
        p = np.concatenate([masked(tr, pr, task)[1] for tr, pr in scenes])
        assert NEVER_PREDICTED[task][0] in t and NEVER_PREDICTED[task][0] not in p
        assert set(p.tolist()) - set(t.tolist()) >= {IGNORE}
        assert len(set(p.tolist()) - set(t.tolist()) - {IGNORE}) >= 1
    fixture = {
        "generator": "model/tests/reference/make_metrics_fixture.py",
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "encoding": "row-major, one char per pixel: 0-9 and a = classes 0-10, - = 255",
        "scenes": [
            {
                "name": f"scene{i}",
                "shape": [h, w],
                "truth": {task: encode(truth[task]) for task in CLASSES},
                "pred": {task: encode(pred[task]) for task in CLASSES},
                "expected": scores([(truth, pred)]),
            }
            for i, ((h, w), (truth, pred)) in enumerate(zip(SHAPES, scenes))
        ],
        "pooled": scores(scenes),
    }
    path = os.path.join("model", "tests", "data", "metrics_fixture.json")
    with open(path, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes): pooled {fixture['pooled']}")


if __name__ == "__main__":
    main()
