#!/usr/bin/env python3
"""Open an icefm store with zarr-python, xarray and pyarrow only (no icefm code) and compare
with the values icefm itself reported (a JSON file written by the Rust test).

Usage: check_store.py STORE EXPECTED.json
Exit status 0 when every value agrees; prints one line per check.
"""
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import xarray as xr
import zarr


def main() -> int:
    store, expected_path = sys.argv[1], sys.argv[2]
    expected = json.load(open(expected_path))
    root = zarr.open_group(store, mode="r")
    attrs = root.attrs["icefm"]
    assert attrs["format_version"] == 1, attrs["format_version"]
    assert attrs["levels"] == expected["levels"], (attrs["levels"], expected["levels"])
    checks = 0
    for e in expected["arrays"]:
        arr = root[e["node"]]
        data = arr[...]
        assert list(data.shape) == e["shape"], (e["node"], data.shape, e["shape"])
        if data.dtype == np.float32:
            nan = int(np.isnan(data).sum())
            total = float(np.nansum(data.astype(np.float64)))
            assert nan == e["nan"], (e["node"], nan, e["nan"])
            assert abs(total - e["sum"]) <= 1e-6 * max(1.0, abs(e["sum"])), (e["node"], total, e["sum"])
        else:
            hist = np.bincount(data.ravel(), minlength=256).tolist()
            got = {str(k): v for k, v in enumerate(hist) if v}
            assert got == e["hist"], (e["node"], got, e["hist"])
        # One window, element by element.
        c0, y0, x0 = e["window_at"]
        win = data[c0, y0 : y0 + 4, x0 : x0 + 4].ravel().tolist()
        want = [float("nan") if v is None else v for v in e["window"]]
        assert np.allclose(win, want, equal_nan=True, rtol=0, atol=0), (e["node"], win, want)
        checks += 1
    # xarray opens a level group with named dimensions, without icefm.
    first = expected["arrays"][0]["node"].rsplit("/", 1)[0]
    ds = xr.open_zarr(store, group=first, consolidated=False)
    assert set(ds.data_vars) >= {"sar", "labels", "aux"}, list(ds.data_vars)
    assert ds["sar"].dims == ("sar_channel", "y", "x"), ds["sar"].dims
    assert ds["labels"].dims == ("task", "y", "x"), ds["labels"].dims
    assert ds.sizes["y"] == ds["labels"].shape[1], dict(ds.sizes)
    # The channel names are coordinates: select a task or a channel by name.
    assert ds["task"].values.tolist() == ["SIC", "SOD", "FLOE"], ds["task"].values
    assert ds["sar_channel"].values.tolist() == ["HH", "HV"], ds["sar_channel"].values
    assert ds["aux_channel"].values.tolist() == ["incidence_angle", "distance_map"]
    sod = ds["labels"].sel(task="SOD").values
    assert np.array_equal(sod, root[first + "/labels"][1]), first
    hv = ds["sar"].sel(sar_channel="HV").values
    assert np.array_equal(hv, root[first + "/sar"][1], equal_nan=True), first
    # Rows and columns are placed in metres along the grid, cell centres, at every level.
    spacing = root[first].attrs["spacing_m"]
    for dim in ("y", "x"):
        want = (np.arange(ds.sizes[dim]) + 0.5) * spacing
        assert np.array_equal(ds[dim].values, want), (dim, ds[dim].values[:3], want[:3])
        assert ds[dim].attrs["units"] == "m", ds[dim].attrs
    checks += 1
    # The whole store as one xarray DataTree: every scene's levels and its 2 km grid, whose
    # dimensions do not clash with the levels' below it.
    tree = xr.open_datatree(store, engine="zarr", consolidated=False)
    footprints = {
        r["scene_id"]: r for r in pq.read_table(f"{store}/manifests/scenes.parquet").to_pylist()
    }
    located = 0
    for scene in expected["scene_ids"]:
        node = tree["scenes"][scene]
        assert set(expected["levels"]) <= set(node.children), (scene, list(node.children))
        if "grid2km" in node.data_vars:
            assert node["grid2km"].dims == ("variable", "y_2km", "x_2km"), node["grid2km"].dims
            names = node["variable"].values.tolist()
            assert names == root[f"scenes/{scene}/grid2km"].attrs["variables"], names
            first_var = node["grid2km"].sel(variable=names[0]).values
            assert np.array_equal(first_var, node["grid2km"].values[0], equal_nan=True), scene
            # The 2 km cells on the levels' axes: a level's cell centre selects the 2 km cell
            # that holds it.
            cell = root[f"scenes/{scene}/grid2km"].attrs["cell_size_m"]
            assert np.array_equal(node["y_2km"].values, (np.arange(node.sizes["y_2km"]) + 0.5) * cell)
            level = node[expected["levels"][-1]]
            picked = node["grid2km"].sel(y_2km=level["y"], x_2km=level["x"], method="nearest")
            rows = np.minimum((level["y"].values // cell).astype(int), node.sizes["y_2km"] - 1)
            assert np.array_equal(picked["y_2km"].values, (rows + 0.5) * cell), scene
        # Raw scenes: each 2 km cell's latitude and longitude, coordinates of the grid (CF
        # `coordinates`), inside the tie points' bounds in the scenes manifest.
        if "latitude" in root[f"scenes/{scene}"]:
            grid = node["grid2km"]
            assert {"latitude", "longitude"} <= set(grid.coords), list(grid.coords)
            assert grid["latitude"].dims == ("y_2km", "x_2km"), grid["latitude"].dims
            assert grid["latitude"].attrs["units"] == "degrees_north", grid["latitude"].attrs
            lat = root[f"scenes/{scene}/latitude"][...]
            lon = root[f"scenes/{scene}/longitude"][...]
            assert np.array_equal(grid["latitude"].values, lat), scene
            assert np.array_equal(grid["longitude"].values, lon), scene
            row = footprints[scene]
            assert row["min_latitude"] <= lat.min() and lat.max() <= row["max_latitude"], scene
            assert row["west_longitude"] <= lon.min() and lon.max() <= row["east_longitude"], scene
            located += 1
    assert located == expected["located"], (located, expected["located"])
    checks += 1
    # Manifests through pyarrow.
    for name, rows in expected["manifest_rows"].items():
        t = pq.read_table(f"{store}/manifests/{name}.parquet")
        assert t.num_rows == rows, (name, t.num_rows, rows)
        checks += 1
    scenes = pq.read_table(f"{store}/manifests/scenes.parquet").to_pylist()
    assert sorted(s["scene_id"] for s in scenes) == sorted(expected["scene_ids"])
    for s in scenes:
        assert sum(s["sic_pixels"]) == s["height"] * s["width"], s["scene_id"]
    print(f"interop: {checks} checks passed (zarr {zarr.__version__}, xarray {xr.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
