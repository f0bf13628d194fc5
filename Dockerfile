# MinT mesh services. CPU torch by default; pass --build-arg TORCH_SPEC=... for a CUDA build.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY mintmesh ./mintmesh
COPY services ./services
COPY cache ./cache
COPY kernels ./kernels
COPY bench ./bench
RUN pip install .
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["mint", "--help"]
