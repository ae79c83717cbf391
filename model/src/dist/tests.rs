//! The ranks' meeting, agreements and sums, with ranks in threads over TCP on this host.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;

use super::*;
use candle_core::Device;

/// A port free a moment ago on this host.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spec(rank: usize, world: usize, port: u16) -> DistSpec {
    DistSpec::parse(&format!("{rank}/{world}@127.0.0.1:{port}")).unwrap()
}

/// `world` ranks in threads, each running `f` on its group.
fn ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(&mut Group) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    ranks_with(world, SumPath::default(), f)
}

/// [`ranks`] with the gradient sums of `sum`.
fn ranks_with<T: Send + 'static>(
    world: usize,
    sum: SumPath,
    f: impl Fn(&mut Group) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut g =
                    Group::connect_with(&spec(r, world, port), Duration::from_secs(20), sum)
                        .unwrap();
                assert_eq!((g.rank(), g.world(), g.is_leader()), (r, world, r == 0));
                f(&mut g)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn specs_parse_and_slurm_variables_give_rank_world_and_address() {
    let s = DistSpec::parse("1/4@node01:29501").unwrap();
    assert_eq!(
        (s.rank, s.world, s.addr.as_str(), s.local_rank),
        (1, 4, "node01:29501", 1)
    );
    for bad in [
        "4/4@h:1",
        "1/0@h:1",
        "1/2",
        "1/2@h",
        "1/2@:5",
        "a/2@h:1",
        "1/2@h:99999",
    ] {
        assert!(DistSpec::parse(bad).is_err(), "{bad}");
    }
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    const SLURM: [(&str, &str); 5] = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7"),
        ("SLURM_JOB_ID", "123456"),
    ];
    let s = DistSpec::from_slurm(&env(&SLURM)).unwrap();
    assert_eq!(
        (s.rank, s.world, s.local_rank, s.addr.as_str()),
        (5, 8, 1, "10.0.0.7:32956")
    );
    const MASTER: [(&str, &str); 4] = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
        ("MASTER_ADDR", "gpu17"),
        ("MASTER_PORT", "40000"),
    ];
    let s = DistSpec::from_slurm(&env(&MASTER)).unwrap();
    assert_eq!(
        (s.rank, s.local_rank, s.addr.as_str()),
        (0, 0, "gpu17:40000")
    );
    let e = DistSpec::from_slurm(&env(&[("SLURM_NTASKS", "2")])).unwrap_err();
    assert!(e.contains("SLURM_PROCID is not set"), "{e}");
    let e =
        DistSpec::from_slurm(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")])).unwrap_err();
    assert!(e.contains("MASTER_ADDR"), "{e}");
}

#[test]
fn sums_are_added_in_rank_order_and_the_same_on_every_rank() {
    // Values whose sum depends on the order of addition in f32.
    let vals = [1e8f32, 1.0, -1e8, 0.5];
    for sum in [SumPath::Chain, SumPath::Star] {
        let out = ranks_with(4, sum, move |g| {
            let mut buf = vec![vals[g.rank()], g.rank() as f32, 2.0];
            g.all_reduce_sum(&mut buf).unwrap();
            buf
        });
        let expect = vec![((1e8f32 + 1.0) - 1e8) + 0.5, 6.0, 8.0];
        for b in &out {
            assert_eq!(b, &expect, "{sum:?}");
        }
    }
}

#[test]
fn the_chain_and_the_star_give_the_same_bits_over_several_chunks() {
    // More than two of the chain's chunks, the last one partial; every rank's values
    // differ in magnitude so that the order of addition shows in the bits.
    let len = 2 * chain::CHUNK + 1_001;
    let value = |r: usize, i: usize| -> f32 {
        let x = ((i * 7_919 + r * 104_729) % 10_007) as f32 / 10_007.0 - 0.5;
        x * 10f32.powi((r as i32 * 3 + (i % 5) as i32) % 9 - 4)
    };
    for world in [2usize, 3] {
        let mut expect: Vec<f32> = (0..len).map(|i| value(0, i)).collect();
        for r in 1..world {
            expect
                .iter_mut()
                .enumerate()
                .for_each(|(i, e)| *e += value(r, i));
        }
        for sum in [SumPath::Chain, SumPath::Star] {
            let out = ranks_with(world, sum, move |g| {
                let mut buf: Vec<f32> = (0..len).map(|i| value(g.rank(), i)).collect();
                // Twice: the links are reused from one sum to the next.
                g.all_reduce_sum(&mut buf).unwrap();
                let first = buf.clone();
                let mut buf: Vec<f32> = (0..len).map(|i| value(g.rank(), i)).collect();
                g.all_reduce_sum(&mut buf).unwrap();
                (first, buf)
            });
            for (r, (first, second)) in out.iter().enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(first) == bits(&expect) && bits(second) == bits(&expect),
                    "{sum:?}, {world} ranks: rank {r}'s sums are not the rank-order sums"
                );
            }
        }
    }
}

#[test]
fn sum_paths_parse_and_ranks_that_disagree_on_theirs_fail_with_the_reason() {
    assert_eq!(SumPath::parse("star"), Ok(SumPath::Star));
    assert_eq!(SumPath::parse(" chain "), Ok(SumPath::Chain));
    let e = SumPath::parse("ring").unwrap_err();
    assert!(e.contains("expected chain or star"), "{e}");
    let port = free_port();
    let handles: Vec<_> = [SumPath::Chain, SumPath::Star]
        .into_iter()
        .enumerate()
        .map(|(r, sum)| {
            std::thread::spawn(move || {
                Group::connect_with(&spec(r, 2, port), Duration::from_secs(20), sum)
                    .err()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    for h in handles {
        let e = h.join().unwrap();
        assert!(
            e.contains(
                "gradient sums (ICEFM_DIST_SUM) differ: rank 0 has \"chain\", rank 1 has \"star\""
            ),
            "{e}"
        );
    }
}

#[test]
fn gather_agree_and_check_same_see_every_rank() {
    let out = ranks(3, |g| {
        let all = g.all_gather(format!("r{}", g.rank()).as_bytes()).unwrap();
        let empty = g.all_gather(&[]).unwrap();
        let any = g.agree(g.rank() == 2).unwrap();
        let none = g.agree(false).unwrap();
        let same = g.check_same("seed", "7").is_ok();
        let differ = g
            .check_same("configuration", if g.rank() == 1 { "b" } else { "a" })
            .unwrap_err()
            .to_string();
        (all, empty, any, none, same, differ)
    });
    for (all, empty, any, none, same, differ) in out {
        assert_eq!(all, vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
        assert_eq!(empty, vec![Vec::<u8>::new(); 3]);
        assert!(any && !none && same);
        assert!(
            differ.contains("configuration differ: rank 0 has \"a\", rank 1 has \"b\""),
            "{differ}"
        );
    }
}

#[test]
fn gradients_become_their_weighted_mean_over_the_ranks() {
    let out = ranks(2, |g| {
        let dev = Device::Cpu;
        let a = Var::from_vec(vec![0f32; 4], (2, 2), &dev).unwrap();
        let b = Var::from_vec(vec![0f32; 3], 3, &dev).unwrap();
        let r = g.rank() as f32;
        // Rank r's loss: (r + 1) · Σ a + (r + 2) · Σ b, a mean over w = 1 + 3r terms.
        let loss = ((a.as_tensor().sum_all().unwrap() * f64::from(r + 1.0)).unwrap()
            + (b.as_tensor().sum_all().unwrap() * f64::from(r + 2.0)).unwrap())
        .unwrap();
        let mut grads = loss.backward().unwrap();
        let w = Tensor::new(1.0 + 3.0 * r, &dev).unwrap();
        let vals = [Tensor::new(&[10.0 * (r + 1.0), r][..], &dev).unwrap()];
        let red = g
            .reduce(
                &mut grads,
                &[a.clone(), b.clone()],
                &vals,
                Weights::Scale(&w),
            )
            .unwrap();
        let ga = grads.get(a.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        (ga, gb, red[0].to_vec1::<f32>().unwrap())
    });
    // (1·1 + 4·2) / 5 for a, (1·2 + 4·3) / 5 for b; values (1·[10, 0] + 4·[20, 1]) / 5.
    for (ga, gb, v) in out {
        assert_eq!(ga, vec![vec![1.8f32; 2]; 2]);
        assert_eq!(gb, vec![2.8f32; 3]);
        assert_eq!(v, vec![18.0, 0.8]);
    }
}

#[test]
fn wrong_worlds_twin_ranks_and_absent_ranks_fail_with_the_reason() {
    let port = free_port();
    let hub = std::thread::spawn(move || {
        Group::connect(&spec(0, 3, port), Duration::from_secs(20))
            .err()
            .unwrap()
            .to_string()
    });
    let one = std::thread::spawn(move || {
        Group::connect(&spec(1, 3, port), Duration::from_secs(20))
            .err()
            .map(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(300));
    let twin = Group::connect(&spec(1, 3, port), Duration::from_secs(20))
        .err()
        .unwrap()
        .to_string();
    let hub = hub.join().unwrap();
    assert!(hub.contains("two processes say they are rank 1"), "{hub}");
    // One of the two rank 1s is told why; the other sees rank 0 go.
    let one = one.join().unwrap().unwrap_or_default();
    assert!(
        twin.contains("two processes") || one.contains("two processes"),
        "{twin} / {one}"
    );

    let port = free_port();
    let hub = std::thread::spawn(move || {
        Group::connect(&spec(0, 2, port), Duration::from_secs(20))
            .err()
            .unwrap()
            .to_string()
    });
    std::thread::sleep(Duration::from_millis(100));
    let other = Group::connect(&spec(1, 3, port), Duration::from_secs(20))
        .err()
        .unwrap()
        .to_string();
    let hub = hub.join().unwrap();
    assert!(
        hub.contains("was started with 3 ranks, rank 0 with 2"),
        "{hub}"
    );
    assert!(other.contains("was started with 3 ranks"), "{other}");

    let port = free_port();
    let alone = Group::connect(&spec(0, 3, port), Duration::from_millis(300))
        .err()
        .unwrap()
        .to_string();
    assert!(
        alone.contains("for ranks 1, 2 of 3: they never connected"),
        "{alone}"
    );
    let unreachable = Group::connect(&spec(2, 3, free_port()), Duration::from_millis(300))
        .err()
        .unwrap()
        .to_string();
    assert!(
        unreachable.contains("rank 2 could not reach rank 0"),
        "{unreachable}"
    );
}

#[test]
fn a_rank_that_leaves_ends_the_others_with_an_error() {
    for sum in [SumPath::Chain, SumPath::Star] {
        let out = ranks_with(3, sum, |g| {
            if g.rank() == 2 {
                // Leaves before the exchange (drop closes its connections).
                return String::new();
            }
            let mut buf = vec![1.0f32; 8];
            g.all_reduce_sum(&mut buf).err().unwrap().to_string()
        });
        // The star: rank 0 sees rank 2 go, and rank 1 sees rank 0 go. The chain: rank 1
        // sees rank 2 go and shuts its links, so rank 0 loses rank 1, and says that rank 1
        // or one beyond it left.
        let (zero, one) = match sum {
            SumPath::Star => ("rank 2 left the run", "rank 0 left the run"),
            SumPath::Chain => (
                "rank 1, or a rank beyond it on the chain, left the run",
                "rank 2 left the run (its own output says why)",
            ),
        };
        assert!(out[0].contains(zero), "{sum:?}: {}", out[0]);
        assert!(out[1].contains(one), "{sum:?}: {}", out[1]);
    }
}

#[test]
fn ranks_whose_buffers_differ_in_length_fail_and_none_waits() {
    for sum in [SumPath::Chain, SumPath::Star] {
        let out = ranks_with(3, sum, |g| {
            let mut buf = vec![1.0f32; if g.rank() == 2 { 9 } else { 8 }];
            g.all_reduce_sum(&mut buf).err().unwrap().to_string()
        });
        let (who, why) = match sum {
            SumPath::Chain => (
                2,
                "rank 1 sums 8 values, rank 2 9: the ranks' models differ",
            ),
            SumPath::Star => (0, "rank 2 sent 9 gradient values, rank 0 has 8"),
        };
        assert!(out[who].contains(why), "{sum:?}: {}", out[who]);
    }
}

#[test]
fn a_rank_that_falls_silent_ends_the_others_after_the_exchange_time_limit() {
    for sum in [SumPath::Star, SumPath::Chain] {
        let out = ranks_with(3, sum, |g| {
            g.set_exchange_timeout(Duration::from_millis(300));
            // Rank 2 stops answering for longer than the limit (a frozen process).
            if g.rank() == 2 {
                std::thread::sleep(Duration::from_millis(1500));
                return String::new();
            }
            let t = std::time::Instant::now();
            let mut buf = vec![1f32; 8];
            let e = g.all_reduce_sum(&mut buf).unwrap_err().to_string();
            assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
            e
        });
        // The rank waiting on rank 2 gives up after the limit; the other, waiting on it or
        // on the limit, ends as well.
        let silent = "within the exchange time limit (ICEFM_DIST_STEP_TIMEOUT, default 1800 s)";
        assert!(
            out[..2].iter().any(|e| e.contains(silent)),
            "{sum:?}: {out:?}"
        );
        for e in &out[..2] {
            assert!(
                e.contains(silent) || e.contains("left the run"),
                "{sum:?}: {e}"
            );
        }
    }
}

#[test]
fn time_limits_from_the_environment_are_positive_finite_seconds_or_errors() {
    let d = Duration::from_secs(300);
    assert_eq!(super::spec::seconds("X", None, d), Ok(d));
    assert_eq!(
        super::spec::seconds("X", Some(" 2.5 "), d),
        Ok(Duration::from_millis(2500))
    );
    // Each of these fell back to the default without a word, or panicked (inf, 1e20).
    for bad in ["inf", "1e20", "NaN", "0", "-3", "soon", ""] {
        let e = super::spec::seconds("ICEFM_DIST_TIMEOUT", Some(bad), d).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "ICEFM_DIST_TIMEOUT={bad}: expected a number of seconds"
            )),
            "{e}"
        );
    }
}
