//! Link the system HDF5 library: the same one netCDF-C is built on.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=HDF5_DIR");
    if let Ok(dir) = std::env::var("HDF5_DIR") {
        println!("cargo:rustc-link-search=native={dir}/lib");
        println!("cargo:rustc-link-lib=dylib=hdf5");
        return;
    }
    // pkg-config names used by Debian/Ubuntu (hdf5, hdf5-serial), Fedora and Homebrew (hdf5).
    for name in ["hdf5", "hdf5-serial", "hdf5_serial"] {
        let Ok(out) = Command::new("pkg-config").args(["--libs", name]).output() else {
            break;
        };
        if !out.status.success() {
            continue;
        }
        for flag in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Some(dir) = flag.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={dir}");
            } else if let Some(lib) = flag.strip_prefix("-l") {
                println!("cargo:rustc-link-lib=dylib={lib}");
            }
        }
        return;
    }
    // Debian's serial HDF5 without pkg-config, then the plain name.
    let debian = "/usr/lib/x86_64-linux-gnu/hdf5/serial";
    if std::path::Path::new(debian).exists() {
        println!("cargo:rustc-link-search=native={debian}");
    }
    println!("cargo:rustc-link-lib=dylib=hdf5");
}
