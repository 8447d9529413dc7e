# meshgate: the gateway, the dashboard and the demo apps in one image.
#
#   docker build -t meshgate:0.1.0 .
#   docker run --rm meshgate:0.1.0 meshgate gateway --config /etc/meshgate/gateway.yaml
#
# There is no ENTRYPOINT: a container's command is the whole command line, `meshgate ...` or
# `python -m meshgate.demoapps.shop ...`, as compose/docker-compose.yml and deploy/kubernetes write them. A
# non-editable `pip install .` (the wheel carries the templates and static files); nothing is fetched at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshgate meshgate
COPY gateway gateway
COPY dashboard dashboard
COPY static static
RUN pip install . && rm -rf /src

# A fixed non-root user. The directories the compose volumes mount are made here, owned by that user, so a new
# named volume starts out writable by it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/meshgate --shell /usr/sbin/nologin meshgate \
    && install -d -o meshgate -g meshgate -m 0700 /var/lib/meshgate /bootstrap
USER 10001:10001
WORKDIR /var/lib/meshgate

CMD ["meshgate", "--help"]
