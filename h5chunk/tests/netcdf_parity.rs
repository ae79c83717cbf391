//! Raw-chunk decoding gives exactly what netCDF-C's own read gives, for every storage the
//! AI4Arctic files may use, and refuses what it cannot decode.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use icefm_h5chunk::{Element, File, Filter, H5Error};
use icefm_netcdf_thread::on_netcdf_thread;

const H: usize = 37;
const W: usize = 53;

/// How one test variable is stored.
struct Spec {
    name: &'static str,
    chunk: Option<[usize; 2]>,
    deflate: Option<(i32, bool)>,
}

fn values(seed: usize) -> Vec<f64> {
    (0..H * W)
        .map(|i| ((i * 7919 + seed * 104729) % 251) as f64 - 100.0)
        .collect()
}

fn write<T: netcdf::NcTypeDescriptor + Copy>(file: &mut netcdf::FileMut, spec: &Spec, data: &[T]) {
    let mut var = file.add_variable::<T>(spec.name, &["y", "x"]).unwrap();
    if let Some(c) = spec.chunk {
        var.set_chunking(&c).unwrap();
    }
    if let Some((level, shuffle)) = spec.deflate {
        var.set_compression(level, shuffle).unwrap();
    }
    var.put_values(data, ..).unwrap();
}

fn specs() -> Vec<Spec> {
    let s = |name, chunk, deflate| Spec {
        name,
        chunk,
        deflate,
    };
    vec![
        s("f32_deflate_shuffle", Some([16, 16]), Some((4, true))),
        s("f32_deflate_odd", Some([10, 7]), Some((1, false))),
        s("f32_rows", Some([1, W]), Some((4, true))),
        s("f32_raw_chunks", Some([8, 32]), None),
        s("i16_packed", Some([16, 20]), Some((4, true))),
        s("f64_ids", Some([32, 32]), Some((4, true))),
        s("i32_ids", Some([12, 53]), Some((6, true))),
        s("u8_chart", Some([20, 20]), Some((4, true))),
        s("f32_contiguous", None, None),
    ]
}

fn make(path: &Path) {
    let path = path.to_path_buf();
    on_netcdf_thread(move || {
        let mut f = netcdf::create(&path).unwrap();
        f.add_dimension("y", H).unwrap();
        f.add_dimension("x", W).unwrap();
        for (k, spec) in specs().iter().enumerate() {
            let v = values(k);
            match spec.name {
                n if n.starts_with("i16") => write(
                    &mut f,
                    spec,
                    &v.iter().map(|&x| (x * 97.0) as i16).collect::<Vec<_>>(),
                ),
                n if n.starts_with("f64") => write(&mut f, spec, &v),
                n if n.starts_with("i32") => write(
                    &mut f,
                    spec,
                    &v.iter().map(|&x| x as i32).collect::<Vec<_>>(),
                ),
                n if n.starts_with("u8") => write(
                    &mut f,
                    spec,
                    &v.iter().map(|&x| (x + 100.0) as u8).collect::<Vec<_>>(),
                ),
                _ => write(
                    &mut f,
                    spec,
                    &v.iter().map(|&x| x as f32 * 0.37).collect::<Vec<_>>(),
                ),
            }
        }
    });
}

fn parity<T: Element + netcdf::NcTypeDescriptor + PartialEq + std::fmt::Debug>(
    path: &Path,
    name: &'static str,
) {
    for (row0, rows) in [(0, H), (0, 16), (5, 11), (16, 21), (36, 1)] {
        let p = path.to_path_buf();
        let (want, raw) = on_netcdf_thread(move || {
            let nc = netcdf::open(&p).unwrap();
            let want: Vec<T> = nc
                .variable(name)
                .unwrap()
                .get_values::<T, _>((row0..row0 + rows, ..))
                .unwrap();
            let h5 = File::open(&p).unwrap();
            let raw = h5.dataset(name).unwrap().read_rows(row0, rows).unwrap();
            drop(h5);
            drop(nc);
            (want, raw)
        });
        let got = raw.decode::<T>().unwrap();
        assert_eq!(got, want, "{name} rows {row0}+{rows}");
    }
}

#[test]
fn every_chunked_storage_decodes_as_netcdf_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.nc");
    make(&path);
    for name in [
        "f32_deflate_shuffle",
        "f32_deflate_odd",
        "f32_rows",
        "f32_raw_chunks",
        "i16_packed",
        "i32_ids",
    ] {
        parity::<f32>(&path, name);
    }
    parity::<f64>(&path, "f64_ids");
    parity::<f64>(&path, "i32_ids");
    parity::<u8>(&path, "u8_chart");
}

#[test]
fn layouts_are_read_and_unsupported_storage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.nc");
    make(&path);
    let p = path.clone();
    let (shuffled, contiguous, missing, i16_to_u8) = on_netcdf_thread(move || {
        let h5 = File::open(&p).unwrap();
        let d = h5.dataset("f32_deflate_shuffle").unwrap();
        let l = d.layout().clone();
        let c = h5.dataset("f32_contiguous").err();
        let m = h5.dataset("no_such_variable").is_err();
        let raw = h5.dataset("i16_packed").unwrap().read_rows(0, 4).unwrap();
        (l, c, m, raw.decode::<u8>().is_err())
    });
    assert_eq!(shuffled.shape, [H, W]);
    assert_eq!(shuffled.chunk, [16, 16]);
    assert_eq!(shuffled.filters, vec![Filter::Shuffle, Filter::Deflate]);
    assert_eq!(shuffled.dtype.size, 4);
    assert!(shuffled.dtype.float);
    assert_eq!(contiguous.as_deref(), Some("not chunked"));
    assert!(missing);
    assert!(
        i16_to_u8,
        "i16 into u8 would wrap where netCDF-C reports a range error"
    );
}

#[test]
fn chunks_never_written_are_reported_for_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.nc");
    let p = path.clone();
    let err = on_netcdf_thread(move || {
        let mut f = netcdf::create(&p).unwrap();
        f.add_dimension("y", 40).unwrap();
        f.add_dimension("x", 10).unwrap();
        let mut v = f.add_variable::<f32>("v", &["y", "x"]).unwrap();
        v.set_chunking(&[10, 10]).unwrap();
        v.set_compression(4, true).unwrap();
        // Only the first chunk is written.
        v.put_values(&[1.0f32; 100], (0..10, ..)).unwrap();
        drop(f);
        let h5 = File::open(&p).unwrap();
        let d = h5.dataset("v").unwrap();
        assert!(d.read_rows(0, 10).is_ok());
        d.read_rows(5, 20).err()
    });
    assert!(
        matches!(err, Some(H5Error::Unallocated { row: 10, col: 0 })),
        "{err:?}"
    );
}
