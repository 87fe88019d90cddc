# cloakonnx in a container: the README's install step, with `cloakonnx` as the entrypoint.
#   docker build -t cloakonnx .
#   docker run --rm -v "$PWD:/work" -w /work cloakonnx harden model.onnx --data calib.npz
FROM python:3.11-slim
WORKDIR /opt/cloakonnx
COPY setup.py setup.cfg README.md ./
COPY cloakonnx ./cloakonnx
RUN pip install --no-cache-dir . && cloakonnx --version
ENTRYPOINT ["cloakonnx"]
CMD ["--help"]
