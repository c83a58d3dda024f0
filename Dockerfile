# The switchboard gateway image: one node per container, listening on 8080,
# in production mode (a 32+ byte secret and explicit browser origins required).
#
#   docker build -t switchboard .
#   docker run -e SWITCHBOARD_JWT_SECRET=$(openssl rand -hex 32) \
#       -e SWITCHBOARD_ALLOWED_ORIGINS=https://chat.example.com -p 8080:8080 switchboard
#
# docker-compose.yml runs two of these behind Redis and PostgreSQL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SWITCHBOARD_ENV=production \
    SWITCHBOARD_HOST=0.0.0.0 \
    SWITCHBOARD_PORT=8080 \
    SWITCHBOARD_LOG_FORMAT=json \
    SWITCHBOARD_WEB_ROOT=/app/web

WORKDIR /app
COPY pyproject.toml setup.cfg README.md ./
COPY server ./server
COPY handlers ./handlers
COPY models ./models
COPY switchboard_client ./switchboard_client
COPY web ./web
RUN pip install --no-compile . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin switchboard \
    && mkdir -p /app/data && chown switchboard /app/data

# Never run as root; the SQLite default (no DATABASE_URL) writes to /app/data.
USER switchboard
ENV SWITCHBOARD_DATABASE_URL=sqlite:////app/data/switchboard.db
EXPOSE 8080

# Readiness pings the database (and Redis when configured); slim has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["switchboard"]
CMD ["serve"]
