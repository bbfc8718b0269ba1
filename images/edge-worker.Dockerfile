# aerekos edge-worker: one static binary on an empty base image.
#
# The build context is a staging directory (see images/README.md):
#   <platform>/edge-worker  static musl binary, e.g. linux/arm64/edge-worker
#   state/                  an empty directory (becomes the writable state dir)
# `docker buildx build --platform …` picks <platform> from TARGETPLATFORM;
# the classic builder needs `--build-arg BIN_DIR=linux/amd64`.
#
# To report the host rather than the container, run it with the host's PID
# and network namespaces (see compose/worker.yml and images/README.md).
FROM scratch

# Identity (state.json, 0600) and the offline queue live here; a named volume
# starts as a copy of this directory, owner included.
# A COPY comes first: the classic builder (DOCKER_BUILDKIT=0) records an
# instruction after FROM scratch that is not a COPY (such as ARG) as the
# build host's platform, and with `--platform linux/arm64` the next COPY then
# fails with "does not match the specified platform"; a COPY takes the
# requested platform, and what follows keeps it (images/README.md, 3a).
COPY --chown=65532:65532 state/ /var/lib/aerekos/

ARG TARGETPLATFORM
ARG BIN_DIR=${TARGETPLATFORM}

COPY ${BIN_DIR}/edge-worker /usr/local/bin/edge-worker

ENV AEREKOS_STATE_DIR=/var/lib/aerekos \
    NO_COLOR=1

USER 65532:65532
VOLUME ["/var/lib/aerekos"]
ENTRYPOINT ["/usr/local/bin/edge-worker"]
