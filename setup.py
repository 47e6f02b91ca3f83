"""ernie5_jax: elastic MoE pre-training of a unified multimodal model in JAX."""

import setuptools

setuptools.setup(
    name="ernie5_jax",
    version="0.1.0",
    description="Elastic Mixture-of-Experts pre-training of a unified multimodal model (JAX/Flax NNX).",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["ernie5_jax*", "pallas_kernels*", "data*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9",
        "array-record>=0.8",
        "seqio>=0.0.19",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "tensorboard>=2.15",  # clu's summary writer needs it; nothing else pulls it in.
        "numpy",
        "absl-py",
        "matplotlib",
        "sentencepiece",
        "safetensors>=0.4",  # Hugging Face checkpoints in and out (ernie5_jax/interop).
        "scikit-learn",  # Bundled 8x8 digits (embedded dataset) and k-means codebooks.
    ],
    package_data={"ernie5_jax.input_pipeline.tokenizers": ["assets/*.model"]},
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3",
                             # The notebooks run in CI (tests/test_notebooks.py).
                             "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6",
                             # libtpu, the TPU compiler, at the version this jax pins: CPU
                             # hosts compile for TPU topologies (--mode=compile, tests/aot).
                             "jax[tpu]"]},
)
