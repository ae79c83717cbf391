#!/usr/bin/env bash
# A store in S3, end to end, against an S3 emulator (moto's server, from PyPI into
# target/s3-check/venv): ingest two generated scenes locally, upload the store to a bucket,
# then through s3:// URLs draw a regime (an upload), inspect it (a listing), train the micro
# MAE for 3 steps, and check that its weights are those of the same run from the local folder,
# byte for byte. The tests (`cargo test`) cover http:// and file:// URLs; this covers S3's own
# requests: signed GETs and HEADs, uploads and listings (docs/object-store.md). The endpoint
# is given as http:// without AWS_ALLOW_HTTP, which icefm takes as asking for plain HTTP.
# Last, the same bucket is read with no AWS_* variable but AWS_PROFILE, through a credentials
# and a config file as `aws configure` writes them (keys, region, endpoint_url).
#
#   scripts/check-s3.sh            # builds the release binary if needed; prints PASS or FAIL
set -euo pipefail
cd "$(dirname "$0")/.."
work=target/s3-check
port=${PORT:-5055}
rm -rf "$work/data" && mkdir -p "$work/data"
if [ ! -x "$work/venv/bin/moto_server" ]; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q "moto[server]" boto3
fi
cargo build --release -q
icefm=$PWD/target/release/icefm
"$work/venv/bin/moto_server" -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null' EXIT
export AWS_ENDPOINT=http://127.0.0.1:$port AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=check AWS_SECRET_ACCESS_KEY=check
for _ in $(seq 50); do
    curl -s -o /dev/null "$AWS_ENDPOINT" && break
    sleep 0.2
done

data=$work/data
"$icefm" synth --count 2 --size 200x220 --out "$data/scenes" >/dev/null 2>&1
"$icefm" ingest --levels 80 --patch 64 --store "$data/s.zarr" "$data/scenes" 2>&1 | tail -1
cat >"$data/upload.py" <<'PY'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT"])
s3.create_bucket(Bucket="ice")
root, n = sys.argv[1], 0
for d, _, files in os.walk(root):
    for f in files:
        s3.upload_file(os.path.join(d, f), "ice", "ai4a.zarr/" + os.path.relpath(os.path.join(d, f), root))
        n += 1
print(f"uploaded {n} files to s3://ice/ai4a.zarr")
PY
"$work/venv/bin/python" "$data/upload.py" "$data/s.zarr"

url=s3://ice/ai4a.zarr
regime=(regime --name half --rule fraction --percent 50 --seed 1 --store)
"$icefm" "${regime[@]}" "$url" | tail -1
"$icefm" "${regime[@]}" "$data/s.zarr" | tail -1
"$icefm" inspect "$url" --regime half | tail -1
diff <("$icefm" inspect "$url") <("$icefm" inspect "$data/s.zarr") && echo "inspect: the bucket's summary is the folder's"
sets=()
for s in model.preset=micro mae.decoder_dim=8 mae.decoder_depth=1 mae.decoder_heads=2 \
    data.levels=80 data.crop=32 data.batch_size=2 train.steps=3 train.warmup_steps=1 \
    data.regime=half; do
    sets+=(--set "$s")
done
for at in "$url" "$data/s.zarr"; do
    out=$data/run-$(basename "$at")
    "$icefm" train --store "$at" --config configs/mae_vit_tiny.toml --out "$out" "${sets[@]}" |
        grep trained
done
loss() { "$icefm" inspect "$1" | grep -o 'loss [0-9.]*' | head -1; }
echo "from S3: $(loss "$data/run-ai4a.zarr"); from the folder: $(loss "$data/run-s.zarr")"
weights=checkpoints/step_0000003/model.safetensors
if ! cmp -s "$data/run-ai4a.zarr/$weights" "$data/run-s.zarr/$weights"; then
    echo "FAIL: the weights after 3 steps differ"
    exit 1
fi
echo "the weights after 3 steps are the same bytes"

# The AWS CLI's files instead of the environment.
home=$data/home
mkdir -p "$home/.aws"
printf '[lab]\naws_access_key_id = check\naws_secret_access_key = check\n' >"$home/.aws/credentials"
printf '[profile lab]\nregion = us-east-1\nendpoint_url = %s\n' "$AWS_ENDPOINT" >"$home/.aws/config"
profile() { env -u AWS_ENDPOINT -u AWS_REGION -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY HOME="$home" "$@"; }
if ! diff <(profile AWS_PROFILE=lab "$icefm" inspect "$url") <("$icefm" inspect "$data/s.zarr"); then
    echo "FAIL: the bucket read through AWS_PROFILE=lab differs"
    exit 1
fi
echo "AWS_PROFILE=lab: the bucket's summary is the folder's"
if profile AWS_PROFILE=nope "$icefm" inspect "$url" 2>"$data/nope.txt" >/dev/null ||
    ! grep -q "AWS_PROFILE=nope: no such profile" "$data/nope.txt"; then
    echo "FAIL: an unknown AWS_PROFILE was not refused by name"
    exit 1
fi
echo "AWS_PROFILE=nope: $(grep -o 'no such profile.*' "$data/nope.txt")"
echo "PASS"
