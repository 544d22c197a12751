"""mmjax: multimodal foundation models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax library and trainer for multimodal foundation models (CLIP, SigLIP, VLMs).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    package_data={"mmjax": ["assets/*.model"]},
    install_requires=[
        # jax 0.10.x is what pip resolves on Python 3.11, 0.12.x on 3.12.
        "jax>=0.10,<0.13",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "ml_collections>=1.0",
        "chex>=0.1.89",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
        ],
        # Converters from open_clip / HF transformers checkpoints and their parity tests (CPU torch).
        "interop": [
            "torch>=2.4",
            "torchvision>=0.19",
            "open_clip_torch>=3.0",
            "transformers>=4.45",
            "safetensors>=0.4",
            "ftfy>=6.0",
            "regex>=2023.0",
        ],
    },
)
