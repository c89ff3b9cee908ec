"""layerguard: backdoor-input detection for TorchServe by layer-wise feature analysis."""

from setuptools import find_packages, setup

setup(
    name="layerguard",
    version="0.2.0",
    description="Flag backdoor-triggered inputs at serving time with layer-wise feature analysis.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["layerguard", "layerguard.*"]),
    # torch is installed first by the Makefile (pinned CPU wheel); a range here never upgrades it.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pillow>=9",
        "pyyaml>=6",
        "threadpoolctl>=3.1",
        "torchserve==0.12.0",
        "torch-model-archiver==0.12.0",
    ],
    extras_require={
        "report": ["matplotlib>=3.7"],
        "test": ["pytest>=7", "ruff>=0.5", "mlxtend>=0.23", "requests>=2.28", "grpcio>=1.60"],
    },
    entry_points={
        "console_scripts": [
            "layerguard-calibrate=layerguard.tooling.cli:calibrate_main",
            "layerguard=layerguard.tooling.cli:main",
        ]
    },
)
