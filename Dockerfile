# atlasburn-proxy as a sidecar: slim Python, a non-root user, state on a volume.
#   docker build -t atlasburn-proxy .
#   docker run -p 127.0.0.1:8787:8787 -v atlasburn-state:/var/lib/atlasburn-proxy \
#     -e ATLASBURN_API_KEY=abn_... atlasburn-proxy
# Publish on 127.0.0.1: a bare -p 8787:8787 serves the daemon (its relay, /metrics, the local API)
# on every interface of the host, and Docker's own iptables rules let it past firewalls like ufw.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 atlasburn \
 && useradd --system --uid 10001 --gid atlasburn --home-dir /var/lib/atlasburn-proxy \
      --shell /usr/sbin/nologin atlasburn \
 && install -d -o atlasburn -g atlasburn -m 0700 /var/lib/atlasburn-proxy

WORKDIR /opt/atlasburn-proxy
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && rm -rf /root/.cache

# Inside the pod the app reaches the sidecar over the pod's network: listen on every interface.
# Precedence: command line > environment > config file > defaults.
ENV ATLASBURN_PROXY_LISTEN=0.0.0.0:8787 \
    STATE_DIRECTORY=/var/lib/atlasburn-proxy

USER 10001:10001
VOLUME ["/var/lib/atlasburn-proxy"]
EXPOSE 8787
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["atlasburn-proxy"]
CMD ["run"]
