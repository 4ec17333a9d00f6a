#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this).
# Ends with one line: "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

hack/deps.sh test || exit 1
export CARGO_TERM_COLOR=never

passed=0
failed=0
count() { passed=$((passed + $1)); failed=$((failed + $2)); }

# Unit, integration and end-to-end tests, each in its own process.
cargo nextest run --workspace --profile ci
junit=target/nextest/ci/junit.xml
if [ -f "$junit" ]; then
  read -r t f e < <(python3 - "$junit" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
for case in r.iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        print(f"FAILED: {case.get('classname')} {case.get('name')}", file=sys.stderr)
print(r.get("tests", 0), r.get("failures", 0), r.get("errors", 0))
PY
)
  count $((t - f - e)) $((f + e))
else
  echo "hack/test.sh: nextest produced no report (the build failed?)" >&2
  count 0 1
fi

# Documentation examples.
# (Not `tee /dev/stderr`: when stderr is a file, tee reopens it truncated.)
doc=$(cargo test --workspace --doc 2>&1)
echo "$doc" >&2
doc=$(echo "$doc" | grep -E '^test result:')
count "$(echo "$doc" | awk '{s+=$4} END {print s+0}')" "$(echo "$doc" | awk '{s+=$6} END {print s+0}')"

# The API documentation builds without broken or private links.
if RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet; then count 1 0
else echo "FAILED: cargo doc (broken or private intra-doc links above)" >&2; count 0 1; fi

# The README's main job, once.
mkdir -p /tmp/claudefs-smoke-mnt
if CLAUDEFS_SOCKET=/tmp/claudefs-smoke.sock CLAUDEFS_IMAGE=/var/tmp/claudefs-smoke.img \
   CLAUDEFS_MOUNT=/tmp/claudefs-smoke-mnt hack/run.sh --once; then count 1 0; else echo "FAILED: hack/run.sh --once" >&2; count 0 1; fi

# The NVMe driver for real: QEMU's emulated controllers behind VFIO in a guest
# (hack/vm-test.sh: setup.sh, the driver's integration tests, bdevperf verify, RPCs).
if hack/vm-test.sh; then count 1 0; else echo "FAILED: hack/vm-test.sh" >&2; count 0 1; fi

# Fuzz targets, briefly (the corpus grows in hack/fuzz.sh runs of any length).
if hack/fuzz.sh 20; then count 1 0; else echo "FAILED: hack/fuzz.sh" >&2; count 0 1; fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
