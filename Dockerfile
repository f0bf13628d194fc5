# MinT mesh services. CPU torch by default; pass --build-arg TORCH_SPEC=... for a CUDA build.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions
WORKDIR /app
# g++ builds the native CPU kernels (kernels/lora_cpu.cpp, attn_cpu.cpp) at image build time.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY mintmesh ./mintmesh
COPY services ./services
COPY cache ./cache
COPY kernels ./kernels
COPY bench ./bench
# [tinker]: the gateway's Tinker API reads the tinker SDK's protobuf schema.
RUN pip install ".[tinker]" \
    && python -c "from mintmesh.kernels import native; \
assert native.load(block=True) and native.load_attn(block=True)"
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["mint", "--help"]
