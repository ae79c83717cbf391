//! Tests of `metrics`.
#![allow(clippy::unwrap_used)]

use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn matrices_follow_the_task_classes() {
    let e = Evaluation::new();
    assert_eq!(e.confusions().map(Confusion::classes), [11, 6, 7]);
    assert_eq!(e.sod.counts().len(), 6 * 7);
}

#[test]
fn perfect_prediction_scores_100() {
    let sic = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255];
    let sod = [0u8, 1, 2, 3, 4, 5, 0, 1, 2, 3, 255, 255];
    let floe = [0u8, 1, 2, 3, 4, 5, 6, 6, 255, 255, 255, 255];
    let mut e = Evaluation::new();
    e.add([&sic, &sod, &floe], [&sic, &sod, &floe]).unwrap();
    let s = e.scores();
    assert_eq!(
        (s.sic_r2, s.sod_f1, s.floe_f1, s.combined),
        (1.0, 1.0, 1.0, 100.0)
    );
    assert_eq!(s.pixels, [11, 10, 8]);
}

#[test]
fn ignored_truth_skips_any_prediction() {
    let mut c = Confusion::new(3);
    c.add(&[255, 0, 255, 1], &[0, 0, 255, 2]).unwrap();
    assert_eq!(c.pixels(), 2);
    assert_eq!((c.count(0, 0), c.count(1, 2)), (1, 1));
    let mut r = R2::new();
    r.add(&[255, 4, 255, 6], &[9, 4, 0, 6]).unwrap();
    assert_eq!((r.pixels(), r.value()), (2, 1.0));
}

#[test]
fn r2_matches_hand_values_and_sklearn_edge_cases() {
    let r2 = |t: &[u8], p: &[u8]| {
        let mut r = R2::new();
        r.add(t, p).unwrap();
        r.value()
    };
    // sklearn: r2_score([1, 2], [2, 1]) = -3; r2_score([1, 2, 3], [1, 2, 4]) = 0.5.
    assert_eq!(r2(&[1, 2], &[2, 1]), -3.0);
    assert_eq!(r2(&[1, 2, 3], &[1, 2, 4]), 0.5);
    // Constant truth: 1.0 if exact, else 0.0 (force_finite=True).
    assert_eq!(r2(&[3, 3], &[3, 3]), 1.0);
    assert_eq!(r2(&[3, 3], &[3, 4]), 0.0);
    // Fewer than two samples: NaN.
    assert!(r2(&[], &[]).is_nan());
    assert!(r2(&[7], &[7]).is_nan());
    assert!(r2(&[255, 255], &[1, 2]).is_nan());
    // A prediction of 255 is the number 255: r2_score([0, 2], [0, 255]) = 1 - 253²/2.
    assert!(close(r2(&[0, 2], &[0, 255]), 1.0 - 253.0 * 253.0 / 2.0));
}

#[test]
fn f1_matches_hand_values() {
    let f1 = |classes, t: &[u8], p: &[u8]| {
        let mut c = Confusion::new(classes);
        c.add(t, p).unwrap();
        c.f1_weighted()
    };
    // sklearn: f1_score([0, 1, 1], [0, 1, 255], average="weighted") = (1 + 2·2/3) / 3.
    assert!(close(f1(2, &[0, 1, 1], &[0, 1, 255]), 7.0 / 9.0));
    // Class 1 true but never predicted; class 2 predicted but never true (weight 0):
    // F1(0) = 2·2/(2+3) = 0.8, F1(1) = 0 → weighted 0.8·2/3.
    assert!(close(f1(3, &[0, 0, 1], &[0, 0, 0]), 0.8 * 2.0 / 3.0));
    assert_eq!(f1(3, &[1, 1], &[2, 2]), 0.0);
    assert!(f1(3, &[], &[]).is_nan());
    assert!(f1(3, &[255], &[1]).is_nan());
}

#[test]
fn none_column_counts_missing_and_out_of_range_predictions() {
    let mut c = Confusion::new(2);
    c.add(&[0, 0, 1, 1, 1], &[0, 255, 1, 7, 2]).unwrap();
    assert_eq!(c.counts(), &[1, 0, 1, 0, 1, 2]);
    assert_eq!((c.support(0), c.support(1), c.support(2)), (2, 3, 0));
    assert_eq!((c.predicted(0), c.predicted(1), c.predicted(2)), (1, 1, 3));
    // The none column lowers recall only: F1(0) = 2/3, F1(1) = 2/4.
    assert!(close(c.f1_weighted(), (2.0 * 2.0 / 3.0 + 3.0 * 0.5) / 5.0));
    assert_eq!(c.to_csv(), "true\\pred,0,1,none\n0,1,0,1\n1,0,1,2\n");
}

fn refs(charts: &[Vec<u8>; 3]) -> [&[u8]; 3] {
    charts.each_ref().map(Vec::as_slice)
}

/// A scene's SIC, SOD and FLOE truth, then its predictions.
type Scene = ([Vec<u8>; 3], [Vec<u8>; 3]);

/// Three scenes of 50 pixels with ignored truth and some wrong predictions.
fn scenes() -> Vec<Scene> {
    (0..3u8)
        .map(|s| {
            let chart = |classes: u8, ignore_every: u8| -> Vec<u8> {
                (0..50u8)
                    .map(|i| match i % ignore_every {
                        0 => IGNORE,
                        _ => (i * (s + 3) + s) % classes,
                    })
                    .collect()
            };
            let wrong = |truth: &[u8], every: usize, classes: u8| -> Vec<u8> {
                let mut pred = truth.to_vec();
                for (i, p) in pred.iter_mut().enumerate().step_by(every) {
                    *p = (*p / 2 + 1 + i as u8) % classes;
                }
                pred
            };
            let truth = [chart(11, 13), chart(6, 7), chart(7, 3)];
            let pred = [
                wrong(&truth[0], 3, 11),
                wrong(&truth[1], 4, 6),
                wrong(&truth[2], 5, 7),
            ];
            (truth, pred)
        })
        .collect()
}

#[test]
fn merge_equals_adding_all_at_once() {
    let scenes = scenes();
    let mut pooled = Evaluation::new();
    let mut merged = Evaluation::new();
    for (truth, pred) in &scenes {
        pooled.add(refs(truth), refs(pred)).unwrap();
        let mut scene = Evaluation::new();
        scene.add(refs(truth), refs(pred)).unwrap();
        merged.merge(&scene).unwrap();
    }
    // One call over the concatenated charts.
    let concat = |pick: fn(&Scene) -> &[Vec<u8>; 3]| {
        [0, 1, 2].map(|k| {
            scenes
                .iter()
                .flat_map(|s| pick(s)[k].clone())
                .collect::<Vec<u8>>()
        })
    };
    let (truth, pred) = (concat(|s| &s.0), concat(|s| &s.1));
    let mut once = Evaluation::new();
    once.add(refs(&truth), refs(&pred)).unwrap();
    assert_eq!(pooled, merged);
    assert_eq!(pooled, once);
    let s = pooled.scores();
    assert_eq!(s, once.scores());
    assert_eq!(s.pixels, [138, 126, 99]); // 50 − ⌈50/13⌉, 50 − ⌈50/7⌉, 50 − ⌈50/3⌉, × 3
    assert!(s.sic_r2 < 1.0 && s.sod_f1 < 1.0 && s.floe_f1 < 1.0);
    assert!(s.sic_r2 > 0.0 && s.sod_f1 > 0.0 && s.floe_f1 > 0.0);
    assert!(close(s.combined, combined(s.sic_r2, s.sod_f1, s.floe_f1)));
}

#[test]
fn bad_charts_are_errors_and_count_nothing() {
    let mut e = Evaluation::new();
    let ok: &[u8] = &[0, 1];
    let err = e.add([ok, ok, ok], [ok, ok, &[0]]).unwrap_err();
    assert_eq!(
        err,
        MetricsError::Task {
            task: "FLOE",
            source: Box::new(MetricsError::Length { truth: 2, pred: 1 })
        }
    );
    let err = e.add([ok, &[0, 6], ok], [ok, ok, ok]).unwrap_err();
    assert_eq!(
        err,
        MetricsError::Task {
            task: "SOD",
            source: Box::new(MetricsError::TruthValue {
                value: 6,
                pixel: 1,
                classes: 6
            })
        }
    );
    assert_eq!(e, Evaluation::new());
    let mut c = Confusion::new(3);
    assert_eq!(
        c.merge(&Confusion::new(4)),
        Err(MetricsError::Classes { left: 3, right: 4 })
    );
}

#[test]
fn empty_evaluation_scores_nan_and_serialises_null() {
    let s = Evaluation::new().scores();
    assert!(s.sic_r2.is_nan() && s.sod_f1.is_nan() && s.floe_f1.is_nan() && s.combined.is_nan());
    assert_eq!(s.pixels, [0, 0, 0]);
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(
        json,
        r#"{"sic_r2":null,"sod_f1":null,"floe_f1":null,"combined":null,"pixels":[0,0,0]}"#
    );
}

#[test]
fn scores_for_people_read_a_dash_where_there_is_none() {
    assert_eq!(score_text(0.61234, 3), "0.612");
    assert_eq!(score_text(63.2049, 2), "63.20");
    assert_eq!(score_text(f64::NAN, 2), "-");
    assert_eq!(score_text(f64::INFINITY, 1), "-");
}
