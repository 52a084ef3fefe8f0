# One slim image for every poslake role (producer, consumer, operator CLI).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY infra ./infra
COPY options_model ./options_model
COPY consumer ./consumer
COPY producer ./producer
COPY poslake ./poslake
COPY gateway_sim ./gateway_sim
RUN pip install . && useradd --create-home --uid 10001 poslake && mkdir /lake /spool && chown poslake /lake /spool
USER poslake
# The consumer name defaults to the container's hostname: stable across restarts
# of one replica, unique between replicas.
CMD ["python", "-m", "consumer"]
