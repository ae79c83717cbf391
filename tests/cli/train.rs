//! Training through the executable: a run, its resume and its export, data-parallel ranks (by hand and
//! `--dist local:N`), device and precision errors, Ctrl-C and SIGTERM.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use super::*;

#[test]
fn train_writes_a_run_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let run = dir.path().join("run");
    // A run that cannot start (no such regime, no store) writes nothing: no folder that
    // `inspect` would then report as a run, nor a start that a later run would count.
    let out = micro_train(&store, &run, &["data.regime=nosuch"], false)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
    assert!(!run.exists());
    let out = micro_train(&dir.path().join("none.zarr"), &run, &[], false)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!run.exists());
    // A level where every scene is smaller than one patch (100 x 110 px at 80 m, 20 x 22 at
    // 400 m, in 64-px patches): no patch is half valid, and the refusal says why.
    let coarse = synth_and_ingest(
        &dir.path().join("coarse"),
        1,
        "200x220",
        "default",
        "80,400",
    );
    let out = micro_train(&coarse, &run, &["data.levels=80,400"], false)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "level 400m: no patch of the 1 scene(s) has at least 50 % valid SAR (the largest \
             scene is 20 x 22 px there, inside one 64-px patch"
        ) && err.contains("a smaller `ingest --patch` fits such levels"),
        "{err}"
    );
    assert!(!run.exists());
    let train = |steps: &str, resume: bool| {
        let sets = ["train.checkpoint_every=2", "train.warmup_steps=1", steps];
        micro_train(&store, &run, &sets, resume).output().unwrap()
    };
    let out = ok(train("train.steps=3", false));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("trained 3 steps (now at 3 of 3)"), "{text}");
    for f in [
        "config.toml",
        "log.txt",
        "metrics.parquet",
        "loss.png",
        "checkpoints/step_0000003/model.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f}");
    }
    assert_eq!(png_size(&run.join("loss.png")), (1000, 600));
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("preset = \"micro\""), "{resolved}");
    // Again without --resume: refused; with it and more steps: continues.
    let out = train("train.steps=3", false);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let out = ok(train("train.steps=5", true));
    assert!(String::from_utf8_lossy(&out.stdout).contains("trained 2 steps (now at 5 of 5)"));
    // Its schedule is over train.steps: growing them is said.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: train.steps grew from 3 to 5"),
        "{err}"
    );
    // Fewer steps than it has run: refused, the run's config.toml untouched.
    let config = std::fs::read(run.join("config.toml")).unwrap();
    let out = train("train.steps=4", true);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the run is at step 5 already, past train.steps = 4"),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config);
    // Curves: any column of the metrics, of one run or several; wrong names say what there is.
    let plot = |args: &[&str]| {
        icefm()
            .arg("plot")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let runs = run.to_str().unwrap();
    let out = ok(plot(&[runs, "--metric", "lr", "--smooth", "1"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        run.join("lr.png").to_str().unwrap()
    );
    assert_eq!(png_size(&run.join("lr.png")), (1000, 600));
    ok(plot(&[runs, runs, "--metric", "grad_norm"]));
    assert_eq!(png_size(&dir.path().join("grad_norm.png")), (1000, 600));
    let out = plot(&[runs, "--metric", "los"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no column \"los\"; it has loss, lr, grad_norm"),
        "{err}"
    );
    let err =
        String::from_utf8_lossy(&plot(&[runs, "--metric", "val.combined"]).stderr).to_string();
    assert!(err.contains("has no validation.parquet"), "{err}");
    // A typo in a key is one clear error.
    let out = train("train.stesp=5", false);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `stesp`"));
    // The log records each start (the first and the resume; the refused ones never opened
    // the run): when, which icefm, the command, and the store by its manifests' hash.
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    let starts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!(" icefm {} on ", env!("CARGO_PKG_VERSION"))))
        .collect();
    assert_eq!(starts.len(), 2, "{log}");
    assert!(
        starts[0].starts_with("20") && starts[0].as_bytes()[19] == b'Z',
        "{log}"
    );
    assert!(starts[0].ends_with("--set train.steps=3"), "{log}");
    assert!(starts[1].contains(" --resume"), "{log}");
    let hash = icefm_dataset::table::manifests_hash(&store).unwrap();
    let store_line = format!(
        "  store {}, manifests BLAKE3 {}; data.regime: every scene, 2",
        std::fs::canonicalize(&store).unwrap().display(),
        &hash[..16]
    );
    assert_eq!(log.lines().filter(|l| *l == store_line).count(), 2, "{log}");
    // The same starts, machine-readable.
    let recorded = icefm_model::train::run_starts(&run);
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[1].store, std::fs::canonicalize(&store).unwrap());
    assert_eq!(recorded[1].manifests_blake3.as_deref(), Some(hash.as_str()));
    // And the scenes it trained on, by id: the store's two.
    assert_eq!(recorded[1].trained_scenes.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        recorded[1].command.last().map(String::as_str),
        Some("--resume")
    );
    assert_eq!(recorded[0].log_lines()[0], starts[0]);
    // Where the run stands.
    let out = ok(icefm().arg("inspect").arg(&run).output().unwrap());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("MAE pre-training, ViT micro"), "{summary}");
    assert!(
        summary.contains(&format!(
            "started {}, started again 1 time(s), last ",
            &starts[0][..20]
        )),
        "{summary}"
    );
    assert!(summary.contains(store_line.trim_start()), "{summary}");
    assert!(summary.contains("steps: 5 of 5 (complete)"), "{summary}");
    assert!(summary.contains("(newest 5)"), "{summary}");
    // Export under mmselfsup's names, then import back: the newest checkpoint's tensors, byte
    // for byte, and the run's channels and heads, which the export records in its header.
    let exported = dir.path().join("exported.safetensors");
    let out = ok(icefm()
        .arg("export")
        .arg(&run)
        .arg("--out")
        .arg(&exported)
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("backbone config: img_size=32, patch_size=4, in_channels=2"),
        "{text}"
    );
    // Every neck setting its shapes depend on (MAEPretrainDecoder's defaults are ViT-L's).
    assert!(
        text.contains("neck config: num_patches=64, patch_size=4, in_chans=2, embed_dim=16,"),
        "{text}"
    );
    assert_eq!(
        icefm_model::files::Recorded::read(&exported),
        icefm_model::files::Recorded {
            channels: Some(vec!["HH".into(), "HV".into()]),
            heads: Some(2),
            decoder_heads: Some(2),
        }
    );
    let back = dir.path().join("back.safetensors");
    let out = ok(icefm()
        .arg("import")
        .arg(&exported)
        .arg("--out")
        .arg(&back)
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("note: encoder heads 2, from the file's header")
            && text.contains("note: decoder heads 2, from the file's header"),
        "{text}"
    );
    // The tensors follow the header: `u64` length, then the header.
    let tensors = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + n..].to_vec()
    };
    assert_eq!(
        tensors(&back),
        tensors(&run.join("checkpoints/step_0000005/model.safetensors"))
    );
    assert_eq!(
        icefm_model::files::recorded_channels(&back),
        Some(vec!["HH".to_string(), "HV".to_string()])
    );
    // The heads the header gave are recorded again, so fine-tuning can check them.
    assert_eq!(
        (
            icefm_model::files::Recorded::read(&back).heads,
            icefm_model::files::Recorded::read(&back).decoder_heads
        ),
        (Some(2), Some(2))
    );
    // Channels other than those the exported file records are refused.
    let refused = icefm()
        .arg("import")
        .arg(&exported)
        .args(["--channels", "HV,HH", "--out"])
        .arg(dir.path().join("refused.safetensors"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--channels HV,HH but") && err.contains("records HH,HV"),
        "{err}"
    );
    // The same file without its header's metadata, as a PyTorch checkpoint converted to
    // safetensors has none.
    let bare = dir.path().join("bare.safetensors");
    let bytes = std::fs::read(&exported).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.as_object_mut().unwrap().remove("__metadata__");
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut stripped = (text.len() as u64).to_le_bytes().to_vec();
    stripped.extend_from_slice(text.as_bytes());
    stripped.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&bare, stripped).unwrap();
    assert_eq!(icefm_model::files::recorded_channels(&bare), None);
    // An import told its channels records them, and fine-tuning from it refuses others; their
    // number must be the encoder's.
    let import = |channels: &str, out: &Path| {
        icefm()
            .arg("import")
            .arg(&bare)
            .args(["--channels", channels, "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let swapped = dir.path().join("swapped.safetensors");
    ok(import("HV,HH", &swapped));
    assert_eq!(
        icefm_model::files::recorded_channels(&swapped),
        Some(vec!["HV".to_string(), "HH".to_string()])
    );
    // Heads guessed from the width (no header, no --heads) are not recorded; given ones are.
    assert_eq!(icefm_model::files::Recorded::read(&swapped).heads, None);
    let given = dir.path().join("given.safetensors");
    ok(icefm()
        .arg("import")
        .arg(&bare)
        .args(["--heads", "4", "--out"])
        .arg(&given)
        .output()
        .unwrap());
    assert_eq!(icefm_model::files::Recorded::read(&given).heads, Some(4));
    let one = import("HH", &dir.path().join("one.safetensors"));
    assert_eq!(one.status.code(), Some(2));
    let err = String::from_utf8_lossy(&one.stderr);
    assert!(
        err.contains("1 channel name(s) given (HH), but the encoder reads 2 input channel(s)"),
        "{err}"
    );
    // A micro fine-tuning run from `init` into `out`.
    let seg_config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/seg_vit_tiny.toml");
    let fine_tune_with = |init: &Path, out: &Path, more: &[&str]| {
        icefm()
            .args(["train", "--store"])
            .arg(&store)
            .arg("--config")
            .arg(&seg_config)
            .args(["--set", "model.preset=micro", "--set", "data.levels=80"])
            .args(["--set", "data.crop=32", "--set", "data.batch_size=2"])
            .args(more.iter().flat_map(|m| ["--set", m]))
            .args(["--set", "seg.channels=8", "--init"])
            .arg(init)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let fine_tune = |init: &Path, out: &Path| fine_tune_with(init, out, &[]);
    // Heads other than the encoder's, which its tensors' shapes do not tell: refused from the
    // run's config and from the header of the export's import alike. (The export itself, in
    // mmselfsup's names, is said to be no icefm encoder first.)
    let refused = fine_tune_with(&exported, &dir.path().join("seg-heads"), &["model.heads=4"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("has no encoder.blocks.0.attn.proj.bias") && !err.contains("heads"),
        "{err}"
    );
    for init in [&run, &back] {
        let refused = fine_tune_with(init, &dir.path().join("seg-heads"), &["model.heads=4"]);
        assert_eq!(refused.status.code(), Some(2));
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            err.contains("its encoder has 2 attention heads, this model 4; set model.heads = 2"),
            "{err}"
        );
        assert!(!dir.path().join("seg-heads").exists());
    }
    // A width and heads of no preset train, and the export records them.
    let wide = dir.path().join("wide");
    let sets = ["model.dim=24", "model.heads=3", "train.steps=1"];
    ok(micro_train(&store, &wide, &sets, false).output().unwrap());
    let wide_file = dir.path().join("wide.safetensors");
    let out = ok(icefm()
        .arg("export")
        .arg(&wide)
        .arg("--out")
        .arg(&wide_file)
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("embed_dim=24"), "{text}");
    let out = ok(icefm().arg("inspect").arg(&wide).output().unwrap());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("MAE pre-training, ViT micro, 24 wide, 3 heads (mask ratio"),
        "{summary}"
    );
    assert_eq!(
        icefm_model::files::Recorded::read(&wide_file).heads,
        Some(3)
    );
    let refused = fine_tune(&swapped, &dir.path().join("seg-swapped"));
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("its encoder was trained on data.channels [\"HV\", \"HH\"]"),
        "{err}"
    );
    assert!(!dir.path().join("seg-swapped").exists());
    // Weights changed since the checkpoint was written (one byte of a tensor: the file still
    // parses) are refused by what reads them, not trained or exported.
    let weights = run.join("checkpoints/step_0000005/model.safetensors");
    let state = std::fs::read_to_string(run.join("checkpoints/step_0000005/state.json")).unwrap();
    assert!(
        state.contains("\"blake3\"") && state.contains("\"model.safetensors\": \""),
        "{state}"
    );
    let original = std::fs::read(&weights).unwrap();
    let mut changed = original.clone();
    *changed.last_mut().unwrap() ^= 0x01;
    std::fs::write(&weights, &changed).unwrap();
    let seg = dir.path().join("seg");
    for out in [
        train("train.steps=6", true),
        icefm()
            .arg("export")
            .arg(&run)
            .arg("--out")
            .arg(dir.path().join("x.safetensors"))
            .output()
            .unwrap(),
        // Fine-tuning from them is refused before its run folder is made.
        fine_tune(&weights, &seg),
    ] {
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&weights.display().to_string())
                && err.contains("not the one this checkpoint wrote"),
            "{err}"
        );
    }
    assert!(!seg.exists(), "a refused fine-tuning left its run folder");
    std::fs::write(&weights, &original).unwrap();
    // A damaged checkpoint file is named, with the way out.
    let moments = run.join("checkpoints/step_0000005/optimizer.safetensors");
    std::fs::write(&moments, b"cut short").unwrap();
    // In a shell that sets RUST_BACKTRACE too: candle's errors then carry a backtrace in their
    // text, which icefm keeps out of its one-line errors.
    let sets = [
        "train.checkpoint_every=2",
        "train.warmup_steps=1",
        "train.steps=6",
    ];
    let out = micro_train(&store, &run, &sets, true)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&moments.display().to_string())
            && err.contains("remove this checkpoint's folder to resume from the one before"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn two_processes_train_one_run_with_dist() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let run = dir.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.warmup_steps=1",
        "data.threads=1",
    ];
    // Rank 1 through Slurm's variables, rank 0 through an explicit address; rank 1 first,
    // so it waits for rank 0.
    let mut one = micro_train(&store, &run, &sets, false);
    one.args(["--dist", "slurm"])
        .env("SLURM_PROCID", "1")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_LOCALID", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    let one = one
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut zero = micro_train(&store, &run, &sets, false);
    zero.args(["--dist", &format!("0/2@127.0.0.1:{port}")]);
    let zero = ok(zero.output().unwrap());
    let one = ok(one.wait_with_output().unwrap());
    let text = String::from_utf8_lossy(&zero.stdout);
    assert!(text.contains("trained 3 steps (now at 3 of 3)"), "{text}");
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(text.contains("rank 1 of 2: trained 3 steps"), "{text}");
    assert!(
        String::from_utf8_lossy(&one.stderr)
            .contains("rank 1 of 2: meeting the other ranks at 127.0.0.1:")
    );
    assert!(
        run.join("checkpoints/step_0000003/model.safetensors")
            .exists()
    );
    // A bad --dist is one line.
    let mut bad = micro_train(&store, &dir.path().join("bad"), &sets, false);
    let out = bad
        .args(["--dist", "2/2@localhost:29500"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 2 of 2 ranks does not exist"), "{err}");
}

#[test]
fn a_store_in_object_storage_takes_regimes_and_trains_as_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let url = format!("file://{}", store.display());
    // A regime drawn from the URL lands in the store's regimes/ as one whole file.
    ok(icefm()
        .args([
            "regime",
            "--name",
            "half",
            "--rule",
            "fraction",
            "--percent",
            "50",
        ])
        .args(["--seed", "1", "--store", &url])
        .output()
        .unwrap());
    assert!(store.join("regimes/half.parquet").is_file());
    // Replaced with --force through the URL (a file:// store's draws take turns on the local
    // lock, as a folder's do).
    let first = std::fs::read(store.join("regimes/half.parquet")).unwrap();
    let draw = |seed: &str| {
        icefm()
            .args(["regime", "--name", "half", "--rule", "fraction"])
            .args([
                "--percent",
                "50",
                "--force",
                "--seed",
                seed,
                "--store",
                &url,
            ])
            .output()
            .unwrap()
    };
    let seed = (2..40)
        .map(|s| s.to_string())
        .find(|s| {
            ok(draw(s));
            std::fs::read(store.join("regimes/half.parquet")).unwrap() != first
        })
        .expect("a seed that draws the other scene");
    let out = ok(draw("1"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replaced regime half (--force)"),
        "seed {seed}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(store.join("regimes/half.parquet")).unwrap(),
        first
    );
    // A regime named by its URL reads as by its name (it was taken for a name in the store).
    let by_url = format!("{url}/regimes/half.parquet");
    let out = icefm()
        .args(["regime", "check", &by_url, "half", "--store", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("half and half share 1 scene(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Trained from the folder, from the file:// URL and over HTTP: the same losses.
    let server = http_files::HttpFiles::serve(dir.path());
    let http = format!("{}/s.zarr", server.base);
    let sets = ["train.steps=2", "train.warmup_steps=1", "data.regime=half"];
    let mut runs = Vec::new();
    for (name, at) in [
        ("local", store.display().to_string()),
        ("file", url),
        ("http", http.clone()),
    ] {
        let run = dir.path().join(name);
        ok(micro_train(Path::new(&at), &run, &sets, false)
            .output()
            .unwrap());
        let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
        assert!(log.contains(&format!("store {at}")), "{log}");
        // Over plain HTTP the store's regimes cannot be listed: the named regime trains, said
        // to be unchecked against the test and validation regimes.
        assert_eq!(
            log.contains("cannot be listed over HTTP")
                && log.contains("data.regime `half` is not checked"),
            name == "http",
            "{name}: {log}"
        );
        runs.push(losses(&run));
    }
    // Without a regime, training there would take the test and val regimes' scenes: refused.
    let out = micro_train(
        Path::new(&http),
        &dir.path().join("every"),
        &sets[..2],
        false,
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "so its test and validation regimes are not known: name the regime to train on"
        ),
        "{err}"
    );
    assert_eq!(runs[0].len(), 2);
    assert_eq!(runs[1], runs[0]);
    assert_eq!(runs[2], runs[0]);
    assert!(server.counts().1 > 0, "{:?}", server.counts());
    // The store's summary over HTTP is the folder's, but for its regimes, which a plain HTTP
    // server cannot list (object stores can), and says so.
    let summary = |at: &str| {
        String::from_utf8(ok(icefm().args(["inspect", at]).output().unwrap()).stdout).unwrap()
    };
    let local = summary(&store.display().to_string());
    let remote = summary(&format!("{}/s.zarr", server.base));
    let (local_head, local_regimes) = local.split_once("\nregimes (").unwrap();
    assert_eq!(local_regimes.lines().count(), 3, "{local}");
    assert!(local_regimes.contains("\n  half "), "{local}");
    let (remote_head, remote_regimes) = remote.split_once("\nregimes: ").unwrap();
    assert_eq!(remote_head, local_head);
    assert!(
        remote_regimes.starts_with("not listed over HTTP, which lists no folder")
            && remote_regimes.contains("reads one by name"),
        "{remote}"
    );
    assert!(local.contains("2 scene(s); levels 80m"));
    // One scene's readout over HTTP is the folder's too, but for the regimes holding it.
    let mut ids: Vec<String> = std::fs::read_dir(store.join("scenes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    let scene = |at: &str| {
        String::from_utf8(
            ok(icefm()
                .args(["inspect", at, "--scene", &ids[1]])
                .output()
                .unwrap())
            .stdout,
        )
        .unwrap()
    };
    let local = scene(&store.display().to_string());
    let remote = scene(&format!("{}/s.zarr", server.base));
    let (local_head, local_rest) = local.split_once("\nin regimes: ").unwrap();
    let (remote_head, remote_rest) = remote
        .split_once("\nregimes: not listed over HTTP")
        .unwrap();
    assert_eq!(remote_head, local_head);
    assert!(
        local_head.starts_with(&format!("scene {}\n", ids[1])),
        "{local}"
    );
    assert!(
        local_rest.starts_with("half (") || local_rest.starts_with("none"),
        "{local}"
    );
    assert_eq!(
        local_rest.split_once("\nSIC class balance").unwrap().1,
        remote_rest.split_once("\nSIC class balance").unwrap().1
    );
    // Its arrays at a level, read back over HTTP: the folder's figures.
    let arrays = |at: &str| {
        String::from_utf8(
            ok(icefm()
                .args(["inspect", at, "--scene", &ids[1], "--level", "80"])
                .output()
                .unwrap())
            .stdout,
        )
        .unwrap()
    };
    let local = arrays(&store.display().to_string());
    assert!(
        local.contains("\nHH ") && local.contains("labelled cells   SIC"),
        "{local}"
    );
    assert_eq!(arrays(&format!("{}/s.zarr", server.base)), local);
    // Commands that write a store or read its ingest records refuse a URL, saying what to do.
    for args in [
        vec!["ingest", "--store", "s3://bucket/a.zarr", "x.nc"],
        vec!["inspect", "s3://bucket/a.zarr", "--png", "q.png"],
        vec!["manifest", "merge", "--store", "s3://bucket/a.zarr"],
    ] {
        let out = icefm().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("needs a local store"), "{args:?}: {err}");
    }
}

/// The `loss` column of a run's `metrics.parquet`.
fn losses(run: &Path) -> Vec<f32> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float32Type;
    let file = std::fs::File::open(run.join("metrics.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let c = b.column_by_name("loss").unwrap();
        out.extend(c.as_primitive::<Float32Type>().values().iter().copied());
    }
    out
}

#[test]
fn dist_local_starts_the_ranks_itself_and_trains_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.warmup_steps=1",
        "data.threads=1",
    ];
    let alone = dir.path().join("alone");
    ok(micro_train(&store, &alone, &sets, false).output().unwrap());
    let run = dir.path().join("run");
    let out = ok(micro_train(&store, &run, &sets, false)
        .args(["--dist", "local:2"])
        .output()
        .unwrap());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("starting 2 ranks on this machine (rank 0 at 127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        stdout.contains("trained 3 steps (now at 3 of 3)"),
        "{stdout}"
    );
    assert!(stdout.contains("rank 1 of 2: trained 3 steps"), "{stdout}");
    // Its records say it ran on two ranks.
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    assert!(
        log.contains(", rank 0 of 2 data-parallel ranks): "),
        "{log}"
    );
    let out = ok(icefm().arg("inspect").arg(&run).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" (latest start: 2 data-parallel ranks)"),
        "{text}"
    );
    // Two ranks, one process's step: the same losses.
    let (want, got) = (losses(&alone), losses(&run));
    assert_eq!(want.len(), 3);
    assert_eq!(got.len(), 3);
    for (a, b) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() < 2e-6 * a.abs().max(1.0),
            "{want:?} vs {got:?}"
        );
    }
    // The run folder's refusals are said once too, before any rank starts.
    let out = micro_train(&store, &run, &sets, false)
        .args(["--dist", "local:2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("already holds checkpoints: add --resume")
            .count(),
        1,
        "{err}"
    );
    assert!(!err.contains("starting"), "{err}");
    // Windows larger than the scenes (100 x 110 px at 80 m) are padded: rank 0 alone warns,
    // on stderr and in the run's log.
    let padded = dir.path().join("padded");
    let mut sets_big = sets.to_vec();
    sets_big.push("data.crop=128");
    let out = ok(micro_train(&store, &padded, &sets_big, false)
        .args(["--dist", "local:2"])
        .output()
        .unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    let warning = "warning: level 80m: 2 of the 2 scenes drawn there are smaller than the 128 px \
                   crop (the smallest 100 x 110 px): their windows are padded with no-data \
                   pixels, up to 33 % of a window";
    assert_eq!(err.matches(warning).count(), 1, "{err}");
    let log = std::fs::read_to_string(padded.join("log.txt")).unwrap();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    // A batch the ranks cannot share is said once, before any rank starts.
    let out = micro_train(&store, &dir.path().join("odd"), &sets, false)
        .args(["--dist=local:3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("is not a multiple of the 3 ranks").count(),
        1,
        "{err}"
    );
    assert!(!err.contains("starting"), "{err}");
    assert!(!dir.path().join("odd").exists());
    // So is a device this build cannot use (no CUDA here).
    let out = micro_train(&store, &dir.path().join("gpu"), &sets, false)
        .args(["--dist", "local:2", "--device", "cuda"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("--features cuda").count(), 1, "{err}");
    assert!(!err.contains("starting"), "{err}");
    // And a regime training must not read: refused once, before any rank starts.
    ok(icefm()
        .args([
            "regime",
            "--name",
            "exam",
            "--rule",
            "fraction",
            "--percent",
            "50",
        ])
        .args(["--role", "test", "--store"])
        .arg(&store)
        .output()
        .unwrap());
    let mut sets_exam = sets.to_vec();
    sets_exam.push("data.regime=exam");
    let out = micro_train(&store, &dir.path().join("exam"), &sets_exam, false)
        .args(["--dist", "local:2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("`exam` is a test regime").count(), 1, "{err}");
    assert!(!err.contains("starting"), "{err}");
    assert!(!dir.path().join("exam").exists());
}

#[test]
fn train_names_what_is_wrong_with_a_device_or_a_precision() {
    let dir = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/mae_vit_tiny.toml");
    let run = |extra: &[&str]| {
        let mut c = icefm();
        c.args(["train", "--store"])
            .arg(dir.path())
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(dir.path().join("run"));
        c.args(extra);
        c.output().unwrap()
    };
    // A CPU-only build: CUDA is a rebuild away, and the message says how.
    let out = run(&["--device", "cuda:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
    let out = run(&["--device", "gpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda or cuda:N"));
    let out = run(&["--set", "train.precision=fp16"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected f32 or bf16"));
    // A step no machine's memory holds (the micro model's 4 px patches make a 4096 px crop a
    // million tokens): refused before anything is read, not left to the out-of-memory killer.
    let out = run(&["--set", "model.preset=micro", "--set", "data.crop=4096"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this step cannot fit in memory: one attention matrix of it alone is")
            && err.contains("each of 1048576 tokens: data.crop 4096 px / patch 4 px, squared")
            && err.contains("raise train.accumulate"),
        "{err}"
    );
}

/// The output of `child` once it ends; killed, with a failed test, if that takes over `limit`
/// (a run that ignores its stop signal would otherwise train for ever), and with it every
/// process whose command line holds `also_kill` (its ranks).
fn wait_with_limit(mut child: std::process::Child, limit: Duration, also_kill: &Path) -> Output {
    use std::io::Read;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = vec![];
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("pkill").arg("-f").arg(also_kill).status();
            panic!("still running {limit:?} after the stop signal");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Send `signal` (`-INT`, `-TERM`) to `child` once its run trains: `log` exists, then 1.5 s.
fn signal_once_training(child: &std::process::Child, log: &Path, signal: &str) {
    let t0 = std::time::Instant::now();
    while !log.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let kill = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// Checkpoints `step_N` of a run, by step.
fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            name.strip_prefix("step_")?.parse().ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

#[test]
fn sigterm_to_the_dist_local_launcher_alone_stops_every_rank_at_one_step_and_saves() {
    // `kill PID` (SIGTERM), as a scheduler or a user sends it, to the launcher only: the ranks
    // are not signalled by anyone else, so they stop only if the launcher passes it on.
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let run = dir.path().join("run");
    let sets = [
        "train.steps=1000000",
        "train.checkpoint_every=1000000",
        "train.panel_every=0",
        "data.threads=1",
    ];
    let child = micro_train(&store, &run, &sets, false)
        .args(["--dist", "local:2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = run.join("log.txt");
    signal_once_training(&child, &log, "-TERM");
    let out = wait_with_limit(child, Duration::from_secs(120), &run);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // Stopped, not finished: 130, as the ranks' own (not a rank's failure).
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("failed first") && !stderr.contains("was killed"),
        "{stderr}"
    );
    // It continues as it was started, on two ranks.
    assert!(
        stdout.contains(&format!(
            "continue with: icefm train --resume --store {} --config {} --out {} --dist local:2\n",
            store.display(),
            run.join("config.toml").display(),
            run.display()
        )),
        "{stdout}"
    );
    // Both ranks stopped after the same step, and rank 0 saved it.
    let steps = checkpoint_steps(&run);
    assert_eq!(steps.len(), 1, "{steps:?}");
    let done = steps[0];
    assert!((1..1_000_000).contains(&done), "{done}");
    assert!(
        stdout.contains(&format!("stopped after {done} steps")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("rank 1 of 2: stopped after {done} steps")),
        "{stdout}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("(interrupt)")
    );
}

#[test]
fn a_rank_killed_outright_is_named_and_a_killed_launcher_takes_its_ranks_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 2, "200x220", "default", "80");
    let sets = [
        "train.steps=1000000",
        "train.checkpoint_every=1000000",
        "train.panel_every=0",
        "data.threads=1",
    ];
    let start = |run: &Path| {
        micro_train(&store, run, &sets, false)
            .args(["--dist", "local:2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let pid_of = |pattern: &str| -> String {
        let out = Command::new("pgrep")
            .args(["-f", "--", pattern])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no process {pattern}"))
            .to_string()
    };
    // Rank 1 killed with -9 (as the out-of-memory killer does): the launcher names it, not
    // rank 0 which ended for want of it, and exits as a shell reports a SIGKILL.
    let run = dir.path().join("oom");
    let child = start(&run);
    signal_once_training(&child, &run.join("log.txt"), "-0");
    let rank1 = pid_of(&format!("--out {} .*--dist 1/2@", run.display()));
    assert!(
        Command::new("kill")
            .args(["-9", &rank1])
            .status()
            .unwrap()
            .success()
    );
    let out = wait_with_limit(child, Duration::from_secs(120), &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    assert!(
        stderr.contains(
            "rank 1 of 2 was killed by signal 9 (SIGKILL: the out-of-memory killer, \
                         or kill -9) (the other ranks ended for want of it)"
        ),
        "{stderr}"
    );
    // The launcher killed with -9: its ranks are told (SIGTERM), stop at one step and save,
    // instead of training on, orphaned.
    let run = dir.path().join("orphans");
    let mut child = start(&run);
    signal_once_training(&child, &run.join("log.txt"), "-KILL");
    let _ = child.wait();
    let t0 = std::time::Instant::now();
    let pattern = format!("--out {}", run.display());
    while Command::new("pgrep")
        .args(["-f", "--", &pattern])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the ranks still train without their launcher"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(checkpoint_steps(&run).len(), 1);
    assert!(
        std::fs::read_to_string(run.join("log.txt"))
            .unwrap()
            .contains("(interrupt)")
    );
}

#[test]
fn ctrl_c_stops_training_at_a_step_boundary_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 1, "200x220", "default", "80");
    let run = dir.path().join("run");
    let train = |steps: &str, resume: bool| {
        let sets = [
            "train.checkpoint_every=1000000",
            "train.panel_every=0",
            steps,
        ];
        micro_train(&store, &run, &sets, resume)
    };
    let child = train("train.steps=1000000", false)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A second training into the folder while the first writes it: refused, naming the
    // first, and nothing of the first changed.
    let log = run.join("log.txt");
    let t0 = std::time::Instant::now();
    while !log.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = std::fs::read(run.join("config.toml")).unwrap();
    let second = train("train.steps=7", false).output().unwrap();
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("is being written by another training")
            && err.contains(&format!("process {}", child.id())),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config);
    // `inspect` says it is training now, and who trains it.
    let state = |run: &Path| {
        let out = ok(icefm().arg("inspect").arg(run).output().unwrap());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.starts_with("state: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no state line in {text}"))
    };
    let now = state(&run);
    assert!(
        now.starts_with(&format!("state: training now (process {} on ", child.id())),
        "{now}"
    );
    // SIGINT, as a terminal's Ctrl-C sends.
    signal_once_training(&child, &log, "-INT");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let now = state(&run);
    assert!(
        now.starts_with("state: stopped at step ") && now.ends_with("continue it with --resume"),
        "{now}"
    );
    // A stopped run is not a finished one: `icefm train … && icefm eval …` stops here.
    assert_eq!(out.status.code(), Some(130), "{text}");
    assert!(text.contains("stopped after"), "{text}");
    // The printed command, whole: the run's own config.toml holds every --set.
    let hint = text
        .lines()
        .find_map(|l| l.strip_prefix("continue with: icefm "))
        .unwrap_or_else(|| panic!("no resume command in {text}"));
    let words: Vec<&str> = hint.split(' ').collect();
    let config = run.join("config.toml");
    assert_eq!(
        words,
        [
            "train",
            "--resume",
            "--store",
            store.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--out",
            run.to_str().unwrap()
        ],
        "{text}"
    );
    // The checkpoint of the step it stopped at, and a resume that continues from it.
    let ckpts = checkpoint_steps(&run);
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let done = ckpts[0];
    assert!((1..1_000_000).contains(&done), "{done}");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("(interrupt)")
    );
    // The printed command runs as printed (two steps more, which --resume allows).
    let out = ok(icefm()
        .args(&words)
        .args(["--set", &format!("train.steps={}", done + 2)])
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "trained 2 steps (now at {} of {})",
            done + 2,
            done + 2
        )),
        "{text}"
    );
    assert!(
        !icefm()
            .arg("inspect")
            .arg(&run)
            .output()
            .unwrap()
            .stdout
            .windows(7)
            .any(|w| w == b"state: ")
    );
    // A run that fails says so in its log, and `inspect` says why.
    let failed = dir.path().join("failed");
    let out = micro_train(
        &store,
        &failed,
        &["train.lr=1e30", "train.steps=5", "train.panel_every=0"],
        false,
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let now = state(&failed);
    assert!(now.starts_with("state: failed: step "), "{now}");
    assert!(now.contains("the loss is NaN"), "{now}");
}

#[test]
fn train_refuses_what_would_mix_two_runs_and_warns_of_what_changes_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = synth_and_ingest(dir.path(), 3, "200x220", "default", "80");
    let run = dir.path().join("run");
    let sets = [
        "train.checkpoint_every=2",
        "train.warmup_steps=1",
        "train.steps=2",
    ];
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // --resume of a folder that holds no run.
    let out = micro_train(&store, &run, &sets, true).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err(&out).contains("holds no run (no config.toml)"),
        "{}",
        err(&out)
    );
    // A folder with an earlier training's best checkpoint: a new run is refused.
    std::fs::create_dir_all(run.join("checkpoints/best")).unwrap();
    let out = micro_train(&store, &run, &sets, false).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err(&out).contains("holds the best checkpoint of an earlier training"),
        "{}",
        err(&out)
    );
    assert!(!run.join("config.toml").exists());
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    // A run on a regime, resumed after the regime was drawn again with other scenes: said.
    let regime = |percent: &str, seed: &str| {
        ok(icefm()
            .args([
                "regime", "--name", "pt", "--rule", "fraction", "--role", "pretrain",
            ])
            .args(["--percent", percent, "--seed", seed, "--force", "--store"])
            .arg(&store)
            .output()
            .unwrap())
    };
    regime("34", "1");
    ok(micro_train(
        &store,
        &run,
        &[&sets[..], &["data.regime=pt"]].concat(),
        false,
    )
    .output()
    .unwrap());
    regime("67", "2");
    let more = [&sets[..2], &["train.steps=4", "data.regime=pt"]].concat();
    let out = ok(micro_train(&store, &run, &more, true).output().unwrap());
    assert!(
        err(&out).contains(
            "the scenes to train on are not those of the run's last start (2 added, 1 gone"
        ),
        "{}",
        err(&out)
    );
    // Records lost since the checkpoint (a metrics.parquet written over): said.
    std::fs::remove_file(run.join("metrics.parquet")).unwrap();
    let longer = [&sets[..2], &["train.steps=6", "data.regime=pt"]].concat();
    let out = ok(micro_train(&store, &run, &longer, true).output().unwrap());
    assert!(
        err(&out)
            .contains("metrics.parquet holds records of 0 of the 4 steps before the checkpoint"),
        "{}",
        err(&out)
    );
    // A resume that finds no checkpoint starts at step 0, and says so.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let out = ok(micro_train(&store, &run, &more, true).output().unwrap());
    assert!(
        err(&out).contains("holds no step checkpoint; training starts at step 0"),
        "{}",
        err(&out)
    );
}
