"""mmjax: multimodal foundation models in JAX/Flax."""
from setuptools import find_packages, setup

# The jax each Python gets and the libtpu its `tpu` extra brings, pinned to the pair the tests run on
# (`make test` on 3.11, `make test-latest-jax` on 3.12). jax >= 0.11 needs Python >= 3.12, so 3.11 stays
# on 0.10.x; jax 0.12.1's own tpu extra wants libtpu 0.0.53.*, which is not released, so 3.12+ stays on
# 0.12.0.1. Core and extra share the pin, so `pip install -e .` and `pip install -e ".[tpu]"` give the
# same jax, and adding the extra later never moves it.
JAX_PINS = (  # (environment marker, jax, libtpu)
    ('python_version < "3.12"', "0.10.2", "0.0.42.1"),
    ('python_version >= "3.12"', "0.12.0.1", "0.0.50.1"),
)

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax library and trainer for multimodal foundation models (CLIP, SigLIP, VLMs).",
    url="https://github.com/mmjax/mmjax",  # The notebooks' install cell defaults to it (MMJAX_SOURCE).
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The recipes in configs/ ship as mmjax/configs, so `--config siglip_shapes` works from any directory.
    packages=[*find_packages(include=["mmjax", "mmjax.*"]), "mmjax.configs"],
    package_dir={"mmjax.configs": "configs"},
    package_data={"mmjax": ["assets/*.model", "assets/*.txt"]},
    install_requires=[
        *(f"jax=={jax}; {marker}" for marker, jax, _ in JAX_PINS),
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
            "pycocoevalcap>=1.2",  # reference BLEU/CIDEr/ROUGE-L of tests/test_vlm_metrics.py
            "scikit-learn>=1.3",  # The UCI digits of mmjax.data.digits (README walk-through, tests/test_digits.py).
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
        # libtpu: TPU runs, and ahead-of-time compiles for a TPU topology from any host (`mmjax.compile`,
        # tests/test_tpu_compile.py). Installed, it is tried at every backend start: JAX_PLATFORMS=cpu skips it.
        "tpu": [req for marker, jax, libtpu in JAX_PINS
                for req in (f"jax[tpu]=={jax}; {marker}", f"libtpu=={libtpu}; {marker}")],
    },
)
