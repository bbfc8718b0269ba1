# PostgreSQL on an empty base image, from this host's Debian build: a local
# stand-in for the official `postgres` image where nothing can be pulled
# (the tests run compose/cluster.yml with it). Same interface where it
# matters: data in /var/lib/postgresql/data (a volume), port 5432, uid 999.
# The official image creates POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB at
# first start; this one has no shell to do that, so they are baked in when
# the context is staged:
#
#   images/postgres-stage.sh CONTEXT_DIR USER PASSWORD DB
#   docker build -f images/postgres.Dockerfile -t aerekos-postgres CONTEXT_DIR
FROM scratch

COPY rootfs/ /
# pgdata/data itself, not only its contents: the data directory keeps its
# mode 0700 (PostgreSQL refuses a group- or world-readable one).
COPY --chown=999:999 pgdata/ /var/lib/postgresql/
COPY --chown=999:999 run/ /var/run/postgresql/

ENV PGDATA=/var/lib/postgresql/data
USER 999:999
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres"]
CMD ["-D", "/var/lib/postgresql/data"]
