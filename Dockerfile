FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY capi ./capi
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd --system --uid 10001 capi
USER capi
# SIGTERM stops reading, lets in-flight batches finish, hands the rest back to the queue.
STOPSIGNAL SIGTERM
CMD ["capi", "worker", "--log-json"]
