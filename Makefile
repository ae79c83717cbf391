# The two commands of a fresh machine: `make demo` and `make test`. Both install what they need.
.PHONY: deps demo test bench lint

# netCDF-C/HDF5 for the netcdf crate; a C++ compiler for the kernel emulator's tests;
# numpy/zarr/xarray/pyarrow for the interop test only.
deps:
	@command -v nc-config >/dev/null 2>&1 || { \
	  echo "installing libnetcdf-dev (netCDF-C + HDF5)"; \
	  (apt-get update -qq && apt-get install -y -qq libnetcdf-dev pkg-config >/dev/null) || \
	  { echo "could not install libnetcdf-dev: install netCDF-C and HDF5 development files" >&2; exit 1; }; }
	@command -v c++ >/dev/null 2>&1 || { \
	  echo "installing g++ (the tests' CPU emulator of the CUDA kernels compiles them as C++)"; \
	  (apt-get update -qq && apt-get install -y -qq g++ >/dev/null) || \
	  { echo "could not install g++: install a C++17 compiler" >&2; exit 1; }; }
	@python3 -c "import numpy, zarr, xarray, pyarrow" 2>/dev/null || \
	  python3 -m pip install -q -r tests/interop/requirements.txt

demo: deps
	cargo run --release -- demo

test: deps
	cargo test --release --workspace

bench: deps
	cargo bench -p icefm-ingest --bench ingest
	cargo bench -p icefm-dataset --bench loader
	cargo bench -p icefm-model --bench train_step
	cargo bench -p icefm-model --bench eval_scene
	cargo bench -p icefm-model --bench dist

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
