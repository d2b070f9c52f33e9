"""Install megatron_tokenformer.

On a CPU-only machine install the CPU build of torch first (``pip install torch==2.13.0``, or
``--index-url https://download.pytorch.org/whl/cpu`` elsewhere); a bare ``torch`` requirement
otherwise pulls a multi-GB CUDA build.  NVIDIA apex is optional and never a requirement (the PyPI
package called ``apex`` is an unrelated project): its fused kernels are used only when importable.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_tokenformer",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining and progressive scaling for Tokenformer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # torch 2.13's own floor (deepspeed_boundary.TESTED_PYTHON),
    packages=find_packages(include=["megatron_tokenformer", "megatron_tokenformer.*"]),
    py_modules=["pretrain_tokenformer"],
    install_requires=[
        # the tested range: megatron_tokenformer/deepspeed_boundary.py (checked again at start)
        "torch>=2.13,<2.14",
        "deepspeed>=0.19,<0.20",
        "sentencepiece>=0.1.99",
        "numpy>=1.23",
        "mpi4py>=3.1",
        "tensorboard>=2.10",
        "psutil",
        "xxhash>=3",  # checkpoint checksums (megatron_tokenformer/checkpointing/format/checksums.py)
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3", "matplotlib>=3.5", "ruff>=0.6"],
        "plots": ["matplotlib>=3.5"],
        # models in and out (docs/interop.md): Hugging Face tokenizers/export, lm-evaluation-harness
        "hf": ["transformers>=5.24", "tokenizers>=0.20", "safetensors>=0.4", "lm-eval>=0.4.13", "accelerate>=0.26",
               "pyyaml"],
    },
    entry_points={
        "console_scripts": [
            "tokenformer-pretrain=pretrain_tokenformer:main",
        ],
    },
)
