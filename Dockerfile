# closeproxy in a container, next to a service that talks to Close.
#   docker build -t closeproxy .
#   docker run -p 127.0.0.1:8730:8730 -v closeproxy-data:/data \
#     -e CLOSEPROXY_PROXY_KEY=... -e CLOSEPROXY_CLIENT_ID=... -e CLOSEPROXY_CLIENT_SECRET=... closeproxy
# Inside a container the proxy must listen on 0.0.0.0, so a proxy key is required: without
# one `closeproxy serve` refuses to start (exit 2) rather than expose the account.
# Scoped keys ([keys.NAME] tables, README "Scoped keys"): mount a config file and point
# CLOSEPROXY_CONFIG at it; each key comes from its key_file or CLOSEPROXY_KEY_<NAME>.
FROM python:3.11-slim

RUN groupadd --gid 10001 closeproxy \
    && useradd --create-home --uid 10001 --gid 10001 closeproxy \
    && mkdir -m 0700 /data && chown closeproxy:closeproxy /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY closeproxy ./closeproxy
# The fast extra: uvloop, which serve uses when installed (CLOSEPROXY_EVENT_LOOP=asyncio
# turns it off).
RUN pip install --no-cache-dir './[fast]' && rm -rf /src

# Numeric, so that a runtime can tell it is not root (Kubernetes runAsNonRoot).
USER 10001:10001
WORKDIR /home/closeproxy
# The token file's path is not a secret (hadolint reads TOKEN in a name as one).
# hadolint ignore=DL3064
ENV CLOSEPROXY_HOST=0.0.0.0 \
    CLOSEPROXY_PORT=8730 \
    CLOSEPROXY_TOKEN_FILE=/data/tokens.json \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8730
STOPSIGNAL SIGTERM
# Asks the port the proxy is configured with (CLOSEPROXY_PORT or the config file), not 8730.
HEALTHCHECK --interval=30s --timeout=3s \
    CMD ["python", "-c", "import urllib.request; from closeproxy.config import load_settings; urllib.request.urlopen(f'http://127.0.0.1:{load_settings().port}/healthz', timeout=2)"]
ENTRYPOINT ["closeproxy"]
CMD ["serve"]
