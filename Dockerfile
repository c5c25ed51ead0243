FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY projections projections
COPY gateway gateway
COPY runners runners
COPY policies_wasm policies_wasm
COPY controlplane controlplane
COPY integrations integrations
RUN pip install --no-cache-dir .
CMD ["controlplane", "--help"]
