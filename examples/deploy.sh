#!/bin/sh
# A stand-in deploy script for examples/github-deploy.toml: replace the echo lines with yours.
# Arguments: the pushed ref and commit; the push payload is on stdin. The config's `when` runs
# it for pushes to main only, so the script does not check the branch.
set -eu
if [ $# -ne 2 ]; then
    echo "usage: deploy.sh REF COMMIT" >&2
    exit 2
fi
ref=$1
commit=$2
echo "deploying $ref at $commit (event $WEBHOOKD_EVENT_ID)"
# git fetch origin && git checkout --detach "$commit" && ./build && systemctl restart shop
