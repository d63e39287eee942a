# webhookd in a container: a slim Python, a non-root user, the journal on a volume.
#   docker build -t webhookd .
#   docker run -d --name webhookd -p 127.0.0.1:8080:8080 -v webhookd-data:/var/lib/webhookd \
#     -v "$PWD/webhookd.toml:/etc/webhookd/webhookd.toml:ro" --env-file secrets.env \
#     --stop-timeout 40 webhookd
# --env-file is read once, by `docker run`: an env: secret changed there takes a new container
# (`docker restart` keeps the old values); a file: one (a mounted secret) is read again by
# `docker kill -s HUP webhookd`.
# Mount your config at /etc/webhookd/webhookd.toml. It must listen on 0.0.0.0:8080 inside the container and keep its journal under
# /var/lib/webhookd. The receiver is published on the host's loopback for the TLS proxy in
# front of it (publish -p 8080:8080 only if the proxy is elsewhere). Keep the admin API
# unpublished (or on 127.0.0.1 of the host only).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WEBHOOKD_CONFIG=/etc/webhookd/webhookd.toml

RUN groupadd --system --gid 10001 webhookd \
    && useradd --system --uid 10001 --gid webhookd --home-dir /var/lib/webhookd \
       --shell /usr/sbin/nologin webhookd \
    && mkdir -p /var/lib/webhookd /etc/webhookd \
    && chown webhookd:webhookd /var/lib/webhookd

# Without an init, webhookd would be the container's PID 1, and every process orphaned in the
# container is PID 1's to reap: what a command leaves behind (ended with its process group when
# the command exits) would stay a zombie for good. tini reaps them and passes the signals on
# (SIGTERM drains, SIGHUP reloads), exiting with webhookd's status.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY webhookd ./webhookd
RUN pip install . && rm -rf /src

# By number: a Kubernetes runAsNonRoot can only verify a numeric user.
USER 10001:10001
WORKDIR /var/lib/webhookd
VOLUME ["/var/lib/webhookd"]
EXPOSE 8080 8081

# SIGTERM drains (see the README); give it more than workers.shutdown_grace_s (25 s):
# `docker stop -t 40` / `--stop-timeout 40` / compose `stop_grace_period: 40s`.
STOPSIGNAL SIGTERM
# /healthz answers without admin.token (liveness only, no data), so the probe needs no secret.
# It asks admin.listen's default address, 127.0.0.1:8081, from inside the container: a config
# that moves or turns off the admin API needs this line changed (or `docker run
# --no-healthcheck`), or the container stays unhealthy.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["tini", "--", "webhookd"]
CMD ["serve"]
