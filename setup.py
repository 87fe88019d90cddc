from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("cloakonnx/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

# onnxruntime-gpu wheels exist for x86-64 Linux and Windows; elsewhere (macOS, ARM) the CPU package.
GPU_PLATFORM = ('(platform_system == "Linux" and platform_machine == "x86_64") or '
                '(platform_system == "Windows" and platform_machine == "AMD64")')
CPU_PLATFORM = ('(platform_system != "Linux" or platform_machine != "x86_64") and '
                '(platform_system != "Windows" or platform_machine != "AMD64")')

setup(
    name="cloakonnx",
    version=version["__version__"],
    description="Harden ONNX image classifiers against adversarial inputs with a DeepCloak feature mask, no retraining",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cloakonnx", "cloakonnx.*"]),
    install_requires=[
        "numpy>=1.24",
        "onnx>=1.16",
        f"onnxruntime-gpu>=1.20; {GPU_PLATFORM}",
        f"onnxruntime>=1.20; {CPU_PLATFORM}",
        "onnx-graphsurgeon>=0.5",
        "onnxscript>=0.2",  # torch.onnx's exporter (used by the demo)
        "torch>=2.4",
        "click>=8.1",
        "tqdm>=4.60",
        "scikit-learn>=1.2",  # ships the real handwritten digits the demo uses
        "pillow>=9",
    ],
    extras_require={
        "plot": ["matplotlib>=3.6"],
        "ray": ["ray>=2.9"],
        "dev": ["pytest>=7", "hypothesis>=6", "torchvision", "matplotlib>=3.6", "torchattacks>=3.5", "ray>=2.9"],
    },
    entry_points={"console_scripts": ["cloakonnx=cloakonnx.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Security",
    ],
)
