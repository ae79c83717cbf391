//! Time reading and decompressing a scene's SAR-grid variables band by band (the ingest floor).
fn main() {
    let path =
        std::path::PathBuf::from(std::env::args().nth(1).expect("usage: read_floor FILE.nc"));
    let t = std::time::Instant::now();
    let n = icefm_ingest::netcdf_thread::on_netcdf_thread(move || {
        let r = icefm_ingest::reader::SceneReader::open(&path).expect("open");
        let info = r.info().clone();
        let mut n = 0;
        let mut row0 = 0;
        while row0 < info.height {
            let rows = info.band_rows.min(info.height - row0);
            n += r.read_band_netcdf(row0, rows).expect("band").hh.len();
            row0 += rows;
        }
        (n, info.band_rows)
    });
    println!(
        "{} px, band {} rows, {:.2} s",
        n.0,
        n.1,
        t.elapsed().as_secs_f64()
    );
}
