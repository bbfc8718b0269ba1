# aerekos conductor: one static binary on an empty base image.
#
# The build context is a staging directory (see images/README.md):
#   <platform>/conductor    static musl binary, e.g. linux/amd64/conductor
#   state/                  an empty directory (becomes the writable /data)
# `docker buildx build --platform …` picks <platform> from TARGETPLATFORM;
# the classic builder needs `--build-arg BIN_DIR=linux/amd64`.
FROM scratch

ARG TARGETPLATFORM
ARG BIN_DIR=${TARGETPLATFORM}

COPY ${BIN_DIR}/conductor /usr/local/bin/conductor
# Named volumes start as a copy of this directory, owner included, so the
# unprivileged user can write its SQLite store there.
COPY --chown=65532:65532 state/ /data/
# Where `conductor nats-auth` writes the NATS nodes' configuration in
# compose/cluster.yml (a named volume the nodes mount read-only): empty and
# owned by the same user, for the same reason.
COPY --chown=65532:65532 state/ /nats-auth/

# Every setting is also a flag; these are the container defaults: store in
# the volume, listen on all interfaces of the container.
# SQLite's temporary files go to the volume too (the image has no /tmp), and
# logs carry no colour codes.
ENV AEREKOS_DATA_DIR=/data \
    AEREKOS_HTTP_LISTEN=0.0.0.0:3000 \
    AEREKOS_MQTT_LISTEN=0.0.0.0:1883 \
    AEREKOS_MQTTS_LISTEN=0.0.0.0:8883 \
    SQLITE_TMPDIR=/data \
    NO_COLOR=1

USER 65532:65532
VOLUME ["/data"]
# 3000: HTTPS (and plain HTTP for loopback) API, dashboard, enrolment, Prometheus;
# 8883: embedded broker, MQTT over TLS; 1883: plain MQTT (other hosts only
# with AEREKOS_INSECURE_PLAIN=true: from outside the container nothing is loopback).
EXPOSE 3000 8883 1883
ENTRYPOINT ["/usr/local/bin/conductor"]
CMD ["serve"]
