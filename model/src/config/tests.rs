//! Tests of `config`.
#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn shipped_presets_parse() {
    let b = TrainConfig::parse(include_str!("../../../configs/mae_vit_b.toml"), &[]).unwrap();
    let m = b.mae_config().unwrap();
    assert_eq!(
        (m.encoder.dim, m.encoder.depth, m.encoder.heads),
        (768, 12, 12)
    );
    assert_eq!(
        (m.decoder_dim, m.decoder_depth, m.decoder_heads),
        (512, 8, 16)
    );
    assert_eq!(
        (b.train.steps, b.train.warmup_steps, b.data.crop),
        (30_000, 3000, 384)
    );
    assert_eq!(b.data.levels.split(',').count(), 9);
    assert_eq!(
        (
            b.model.drop_path,
            b.train.weight_decay,
            b.train.warmup_start
        ),
        (0.1, 0.01, 0.3333)
    );
    let t = TrainConfig::parse(include_str!("../../../configs/mae_vit_tiny.toml"), &[]).unwrap();
    assert_eq!(t.mae_config().unwrap().encoder.dim, 192);
}

#[test]
fn shipped_fine_tuning_presets_parse() {
    let b = TrainConfig::parse(include_str!("../../../configs/seg_vit_b.toml"), &[]).unwrap();
    let s = b.seg_config().unwrap();
    assert_eq!((s.encoder.dim, s.layers), (768, [2, 5, 8, 11]));
    assert_eq!(
        (s.head, s.channels, s.sic_loss),
        (HeadKind::UperNet, 768, SicLoss::Mse)
    );
    assert_eq!(s.tasks, Task::ALL.to_vec());
    assert_eq!(s.task_weights, [1.0, 3.0, 3.0]);
    // SAR-IceFM's ft80 schedule: weight decay 0.01, warm-up over 5 % from a third of lr.
    assert_eq!(
        (
            b.train.weight_decay,
            b.train.warmup_steps,
            b.train.warmup_start
        ),
        (0.01, 1500, 0.3333)
    );
    let t = TrainConfig::parse(
        include_str!("../../../configs/seg_vit_tiny.toml"),
        &["seg.tasks=[\"sod\"]".into(), "seg.eval_level=200".into()],
    )
    .unwrap();
    let s = t.seg_config().unwrap();
    assert_eq!((s.head, s.tasks.clone()), (HeadKind::Fcn, vec![Task::Sod]));
    assert_eq!(s.layers, SegConfig::default_layers(12));
    assert_eq!(SegConfig::default_layers(12), [2, 5, 8, 11]);
    assert_eq!(SegConfig::default_layers(2), [0, 0, 0, 1]);
    assert_eq!(t.seg.unwrap().eval_level, "200");
    // The MAE presets have no [seg] section and stay MAE runs.
    let m = TrainConfig::parse(include_str!("../../../configs/mae_vit_tiny.toml"), &[]).unwrap();
    assert!(!m.is_seg() && !m.to_toml().contains("[seg]"));
}

#[test]
fn bad_fine_tuning_keys_are_one_line_errors() {
    let base = include_str!("../../../configs/seg_vit_tiny.toml");
    for (set, want) in [
        ("seg.head=unet", "seg.head `unet`"),
        (
            "seg.tasks=[\"SIC\", \"ICE\"]",
            "`ICE` is not SIC, SOD or FLOE",
        ),
        ("seg.tasks=[\"SOD\", \"SOD\"]", "names SOD twice"),
        ("seg.layers=[1, 2]", "seg.layers has 2 entries"),
        ("seg.layers=[1, 2, 3, 12]", "block 12 is not below"),
        // Blocks 10 and 11 would get no gradient (the run failed at its first step).
        (
            "seg.layers=[2, 5, 8, 9]",
            "seg.layers [2, 5, 8, 9]: blocks 10 to 11 of the encoder come after the last block \
             read and would learn nothing; end the list at block 11 (the last), or give \
             model.depth = 10",
        ),
        ("seg.sic_loss=huber", "seg.sic_loss `huber`"),
        ("seg.eval_blend=max", "seg.eval_blend `max`"),
        ("seg.colour=1", "unknown field `colour`"),
    ] {
        let e = TrainConfig::parse(base, &[set.to_string()]).unwrap_err().0;
        assert!(e.contains(want), "{set}: {e}");
    }
    // With the encoder frozen its blocks learn nothing anyway: any four may be read.
    let probe = [
        "seg.layers=[2, 5, 8, 9]".into(),
        "seg.freeze_encoder=true".into(),
    ];
    assert!(TrainConfig::parse(base, &probe).is_ok());
}

#[test]
fn parse_override_and_reject() {
    let text = "[model]\npreset = \"small\"\n[train]\nsteps = 10\nlr = 1e-3\n";
    let c = TrainConfig::parse(
        text,
        &[
            "train.steps=40".into(),
            "data.regime=pt80".into(),
            "data.levels=80".into(),
            "data.channels=[\"HH\", \"HV\"]".into(),
            "mae.mask_ratio=0.6".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.model.preset, "small");
    assert_eq!(c.train.steps, 40);
    assert_eq!(c.train.lr, 1e-3);
    assert_eq!(c.data.regime, "pt80");
    assert_eq!(c.data.levels, "80");
    assert_eq!(c.mae.mask_ratio, 0.6);
    assert_eq!(c.mae_config().unwrap().encoder.dim, 384);
    // The resolved TOML parses back to the same configuration.
    assert_eq!(TrainConfig::parse(&c.to_toml(), &[]).unwrap(), c);
    // A width and heads of no preset (an imported encoder's, say) over a preset's depth.
    let wide = TrainConfig::parse(text, &["model.dim=512".into(), "model.heads=8".into()]).unwrap();
    let e = wide.mae_config().unwrap().encoder;
    assert_eq!((e.dim, e.heads, e.depth), (512, 8, 12));
    assert_eq!(TrainConfig::parse(&wide.to_toml(), &[]).unwrap(), wide);
    for (text, set, want) in [
        ("[train]\nstep = 3\n", "", "unknown field `step`"),
        ("", "train.steps", "expected section.key=value"),
        ("", "", "the configuration is empty"),
        ("# comments only\n\n", "", "the configuration is empty"),
        ("[model]\n[seg]\n", "", "the configuration is empty"),
        ("", "steps=3", "expected section.key=value"),
        ("[model]\npreset = \"giant\"\n", "", "model.preset `giant`"),
        ("[data]\ncrop = 100\n", "", "multiple of the patch 16"),
        (
            "[data]\nchannels = [\"HH\"]\n",
            "",
            "model.in_channels is 2",
        ),
        (
            "",
            "train.steps=\"many\"",
            "--set train.steps=\"many\": invalid type",
        ),
        (
            "[train]\nsteps = 4\n",
            "train.stepz=3",
            "--set train.stepz=3: unknown field `stepz`",
        ),
        (
            "[model]\npreset = \"small\"\n[train]\nsteps = \"x\"\n",
            "train.lr=2",
            "config line 4 (steps = \"x\"): invalid type: string \"x\", expected u64",
        ),
        (
            "[train]\nsteps = 3\nlr = = 2\n",
            "",
            "config line 3 (lr = = 2)",
        ),
    ] {
        let sets: Vec<String> = if set.is_empty() {
            vec![]
        } else {
            vec![set.into()]
        };
        let e = TrainConfig::parse(text, &sets).err().unwrap().to_string();
        assert!(e.contains(want), "{text:?} {set:?}: {e}");
    }
}

#[test]
fn values_a_run_cannot_train_with_are_refused_naming_the_key() {
    let mae = include_str!("../../../configs/mae_vit_tiny.toml");
    let seg = include_str!("../../../configs/seg_vit_tiny.toml");
    let refused = |text: &str, set: &str, want: &str| {
        let e = TrainConfig::parse(text, &[set.to_string()]).unwrap_err().0;
        assert!(e.contains(want), "{set}: {e}");
    };
    refused(
        mae,
        "train.lr=-1",
        "train.lr -1 must be a number of at least 0",
    );
    refused(mae, "train.lr=nan", "train.lr NaN must be");
    refused(
        mae,
        "train.min_lr=1",
        "train.min_lr 1 must be from 0 to train.lr",
    );
    refused(
        mae,
        "train.weight_decay=-1",
        "train.weight_decay -1 must be",
    );
    refused(mae, "train.clip_grad=-1", "train.clip_grad -1 must be");
    refused(
        mae,
        "model.drop_path=2",
        "model.drop_path 2 is not in [0, 1)",
    );
    refused(
        mae,
        "train.warmup_start=1",
        "train.warmup_start 1: expected a share of train.lr in [0, 1)",
    );
    refused(
        mae,
        "train.keep_last=0",
        "train.keep_last must be at least 1",
    );
    refused(
        mae,
        "mae.decoder_heads=0",
        "mae.decoder_heads must be at least 1",
    );
    // The tiny preset's 3 heads do not divide 256.
    refused(
        mae,
        "model.dim=256",
        "encoder width 256 must be a multiple of 4 and of its 3 heads (model.dim, model.heads)",
    );
    refused(
        mae,
        "model.heads=5",
        "encoder width 192 must be a multiple of 4 and of its 5 heads",
    );
    refused(
        mae,
        "data.channels=[\"HH\", \"HH\"]",
        "data.channels names HH twice",
    );
    // An MAE crop must keep a token visible and mask one: the tiny crop has 36 tokens of 16 px.
    refused(mae, "mae.mask_ratio=0", "keeps 36 token(s) visible");
    refused(mae, "mae.mask_ratio=0.99", "keeps 0 token(s) visible");
    assert!(TrainConfig::parse(mae, &["mae.mask_ratio=0.97".into()]).is_ok());
    refused(
        seg,
        "seg.eval_stride=100000",
        "seg.eval_stride 100000 is longer than data.crop",
    );
    refused(seg, "seg.eval_level=abc", "seg.eval_level `abc`");
    refused(
        seg,
        "seg.task_weights=[0.0, 0.0, 0.0]",
        "give every task of seg.tasks",
    );
    // A trained task of weight 0 beside others: its head would get no gradient, which failed
    // the run at its first step, after its folder was made.
    refused(
        seg,
        "seg.task_weights=[0.0, 1.0, 1.0]",
        "give SIC weight 0: its head would learn nothing; leave SIC out of seg.tasks instead",
    );
    // Weight 0 for a task that is not trained is no matter.
    let sod = TrainConfig::parse(
        seg,
        &[
            "seg.task_weights=[0.0, 1.0, 0.0]".into(),
            "seg.tasks=[\"SOD\"]".into(),
        ],
    );
    assert!(sod.is_ok());
}

#[test]
fn settings_a_fine_tuning_run_does_not_use_are_named() {
    let seg = include_str!("../../../configs/seg_vit_tiny.toml");
    let mae = include_str!("../../../configs/mae_vit_tiny.toml");
    // The shipped configurations, and a run's own resolved config.toml, name none.
    for text in [seg, mae] {
        let c = TrainConfig::parse(text, &[]).unwrap();
        assert_eq!(c.ignored_settings(), Vec::<String>::new());
        let resolved = TrainConfig::parse(&c.to_toml(), &[]).unwrap();
        assert_eq!(resolved.ignored_settings(), Vec::<String>::new());
    }
    let c = TrainConfig::parse(
        seg,
        &[
            "mae.mask_ratio=0.6".into(),
            "mae.decoder_depth=4".into(),
            "train.panel_every=50".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        c.ignored_settings(),
        [
            "mae.decoder_depth = 4 is for MAE pre-training; fine-tuning ignores it",
            "mae.mask_ratio = 0.6 is for MAE pre-training; fine-tuning ignores it",
            "train.panel_every = 50: fine-tuning writes no reconstruction panels (`icefm eval` \
             draws its chart panels)",
        ]
    );
    // An MAE run uses them all.
    let c = TrainConfig::parse(mae, &["mae.mask_ratio=0.6".into()]).unwrap();
    assert!(c.ignored_settings().is_empty());
}

#[test]
fn the_micro_preset_records_the_patch_it_uses() {
    let tiny = include_str!("../../../configs/mae_vit_tiny.toml");
    let micro = |more: &[&str]| {
        let mut o = vec!["model.preset=micro".to_string(), "data.crop=32".to_string()];
        o.extend(more.iter().map(|s| s.to_string()));
        TrainConfig::parse(tiny, &o)
    };
    let c = micro(&[]).unwrap();
    assert_eq!(
        (c.model.patch, c.mae_config().unwrap().encoder.patch),
        (4, 4)
    );
    // Its config.toml says 4, and reads back the same.
    let again = TrainConfig::parse(&c.to_toml(), &[]).unwrap();
    assert_eq!(again.model.patch, 4);
    assert!(c.to_toml().contains("patch = 4"));
    assert_eq!(micro(&["model.patch=4"]).unwrap().model.patch, 4);
    let e = micro(&["model.patch=8"]).unwrap_err().to_string();
    assert!(
        e.contains("model.patch 8: the micro preset's patch is 4"),
        "{e}"
    );
    // Other presets keep the patch they are given.
    let t = TrainConfig::parse(tiny, &["model.patch=8".to_string()]).unwrap();
    assert_eq!(t.mae_config().unwrap().encoder.patch, 8);
}
