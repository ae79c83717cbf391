//! The AutoICE metrics against scikit-learn: `model/tests/reference/make_metrics_fixture.py`
//! wrote three synthetic scenes and scikit-learn's `r2_score` and weighted `f1_score` of each scene
//! and of the pooled pixels to `model/tests/data/metrics_fixture.json`. Every score must match
//! within 1e-9, whether the scenes go into one [`Evaluation`] or into one each that are merged.
#![allow(clippy::unwrap_used, missing_docs)]

use icefm_model::metrics::{Confusion, Evaluation, Scores};
use serde_json::Value;

const FIXTURE: &str = include_str!("data/metrics_fixture.json");
const TOLERANCE: f64 = 1e-9;
const TASKS: [&str; 3] = ["sic", "sod", "floe"];

/// A chart stored one char per pixel: `0`-`9`, `a` = 10, `-` = 255.
fn decode(chart: &str) -> Vec<u8> {
    chart
        .chars()
        .map(|c| match c {
            '-' => 255,
            _ => c.to_digit(11).unwrap() as u8,
        })
        .collect()
}

struct Scene {
    name: String,
    truth: [Vec<u8>; 3],
    pred: [Vec<u8>; 3],
    expected: Value,
}

impl Scene {
    fn evaluation(&self) -> Evaluation {
        let mut e = Evaluation::new();
        e.add(
            self.truth.each_ref().map(Vec::as_slice),
            self.pred.each_ref().map(Vec::as_slice),
        )
        .unwrap();
        e
    }
}

fn fixture() -> (Vec<Scene>, Value) {
    let json: Value = serde_json::from_str(FIXTURE).unwrap();
    let scenes = json["scenes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let pixels = s["shape"][0].as_u64().unwrap() * s["shape"][1].as_u64().unwrap();
            let chart = |side: &str, task: &str| {
                let v = decode(s[side][task].as_str().unwrap());
                assert_eq!(v.len() as u64, pixels, "{side} {task}");
                v
            };
            Scene {
                name: s["name"].as_str().unwrap().to_owned(),
                truth: TASKS.map(|t| chart("truth", t)),
                pred: TASKS.map(|t| chart("pred", t)),
                expected: s["expected"].clone(),
            }
        })
        .collect();
    (scenes, json["pooled"].clone())
}

fn assert_scores(what: &str, got: &Scores, expected: &Value) {
    let pairs = [
        ("sic_r2", got.sic_r2),
        ("sod_f1", got.sod_f1),
        ("floe_f1", got.floe_f1),
        ("combined", got.combined),
    ];
    for (key, value) in pairs {
        let want = expected[key].as_f64().unwrap();
        assert!(
            (value - want).abs() <= TOLERANCE,
            "{what} {key}: {value} vs scikit-learn {want}"
        );
    }
    let pixels: Vec<u64> = expected["pixels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(got.pixels.as_slice(), pixels, "{what} pixels");
}

/// The matrix equals scikit-learn's `confusion_matrix(labels=[0, …, n−1, 255])` (true rows).
fn assert_confusion(what: &str, got: &Confusion, expected: &Value) {
    let rows: Vec<Vec<u64>> = serde_json::from_value(expected.clone()).unwrap();
    assert_eq!(rows.len(), got.classes(), "{what} rows");
    let flat: Vec<u64> = rows.concat();
    assert_eq!(got.counts(), flat.as_slice(), "{what}");
}

#[test]
fn each_scene_matches_sklearn() {
    let (scenes, _) = fixture();
    assert_eq!(scenes.len(), 3);
    for scene in &scenes {
        let e = scene.evaluation();
        assert_scores(&scene.name, &e.scores(), &scene.expected);
        assert_confusion(&scene.name, &e.sod, &scene.expected["sod_confusion"]);
        assert_confusion(&scene.name, &e.floe, &scene.expected["floe_confusion"]);
    }
}

#[test]
fn pooled_scenes_match_sklearn() {
    let (scenes, pooled) = fixture();
    let mut all = Evaluation::new();
    for scene in &scenes {
        all.add(
            scene.truth.each_ref().map(Vec::as_slice),
            scene.pred.each_ref().map(Vec::as_slice),
        )
        .unwrap();
    }
    let scores = all.scores();
    assert_scores("pooled", &scores, &pooled);
    assert_confusion("pooled SOD", &all.sod, &pooled["sod_confusion"]);
    assert_confusion("pooled FLOE", &all.floe, &pooled["floe_confusion"]);
    // Pooling is not the mean of the per-scene scores.
    let mean_r2: f64 = scenes
        .iter()
        .map(|s| s.expected["sic_r2"].as_f64().unwrap())
        .sum::<f64>()
        / 3.0;
    assert!((scores.sic_r2 - mean_r2).abs() > 1e-6);
}

#[test]
fn merged_scene_evaluations_equal_pooled() {
    let (scenes, pooled) = fixture();
    let mut merged = Evaluation::new();
    // Merge in reverse order: integer sums make the order irrelevant.
    for scene in scenes.iter().rev() {
        merged.merge(&scene.evaluation()).unwrap();
    }
    assert_scores("merged", &merged.scores(), &pooled);
    let mut all = Evaluation::new();
    for scene in &scenes {
        all.merge(&scene.evaluation()).unwrap();
    }
    assert_eq!(merged, all);
    assert_eq!(merged.scores(), all.scores());
}

#[test]
fn fixture_covers_the_cases() {
    let (scenes, pooled) = fixture();
    let mut all = Evaluation::new();
    for scene in &scenes {
        all.merge(&scene.evaluation()).unwrap();
    }
    // Ignored truth differs per task.
    let ignored: Vec<usize> = (0..3)
        .map(|k| {
            scenes
                .iter()
                .map(|s| s.truth[k].iter().filter(|&&v| v == 255).count())
                .sum()
        })
        .collect();
    assert!(
        ignored[0] < ignored[1] && ignored[1] < ignored[2],
        "{ignored:?}"
    );
    for (task, c) in [("SOD", &all.sod), ("FLOE", &all.floe)] {
        let n = c.classes();
        // A class predicted but never true, a class true but never predicted, and "no prediction".
        assert!(
            (0..n).any(|k| c.support(k) == 0 && c.predicted(k) > 0),
            "{task}"
        );
        assert!(
            (0..n).any(|k| c.support(k) > 0 && c.predicted(k) == 0),
            "{task}"
        );
        assert!(c.predicted(n) > 0, "{task} none column");
    }
    // SIC predictions have some error; the csv has a header and one row per true class.
    assert!(all.scores().sic_r2 < 0.95);
    let csv = all.sic_confusion.to_csv();
    assert!(csv.starts_with("true\\pred,0,1,2,3,4,5,6,7,8,9,10,none\n"));
    assert_eq!(csv.lines().count(), 1 + 11);
    assert!(pooled["sic_r2"].as_f64().unwrap() > 0.5);
}
