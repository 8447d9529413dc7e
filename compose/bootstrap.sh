#!/bin/sh
# The compose stack's one-shot `bootstrap` service: the mesh CA (created in the dashboard's data volume, as the
# dashboard itself would at start), its root certificate for the gateways' --ca, a join token per group and an
# operator token, all written to the bootstrap volume. Running it again changes nothing: the CA is loaded, not
# replaced, and a token file that already holds a token is kept (no new token is made).
#
# The paths, store and groups come from the environment, with the compose stack's values as defaults.
set -eu

data="${MESHGATE_DATA:-/var/lib/meshgate}"
out="${MESHGATE_BOOTSTRAP:-/bootstrap}"
store="${MESHGATE_STORE:-etcd://etcd:2379}"
groups="${MESHGATE_GROUPS:-shop catalog inventory payments}"

echo "mesh CA: $(meshgate dashboard ca --data "$data" --out "$out/ca.pem")"
for group in $groups; do
    meshgate dashboard token create --store "$store" --role gateway --group "$group" --name "gateway-$group" \
        --out "$out/$group.token"
done
meshgate dashboard token create --store "$store" --role operator --name compose-operator --out "$out/operator.token"
