"""moerl: Mixtures of Experts in deep RL value networks (JAX / Flax / Optax)."""

import setuptools

setuptools.setup(
    name="moerl",
    version="0.1.0",
    description=(
        "Dopamine-style DQN and Rainbow agents whose penultimate layer is a "
        "Soft MoE, Top-k MoE or Expert-Choice module."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tested on 3.11; jax 0.10 needs 3.11
    packages=["agents", "networks", "configs", "experiments"],
    package_data={
        "configs": ["*.gin", "sweeps/*.toml"],
        "experiments": ["data/*.csv"],
    },
    include_package_data=True,
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "chex>=0.1.86",
        "gin-config>=0.5",
        "gymnasium>=1.0",
        "ale-py>=0.10",
        "numpy>=1.26",
        "tensorboard>=2.15",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "psutil>=5.9",
    ],
    extras_require={
        "test": ["pytest>=7", "matplotlib>=3.7", "rliable>=1.2", "pandas<3",
                 "arch<8", "ray>=2.9", "opencv-python-headless"],
        "plot": ["matplotlib>=3.7", "rliable>=1.2", "pandas<3", "arch<8"],
        "ray": ["ray>=2.9"],
    },
    entry_points={"console_scripts": ["moerl=experiments.cli:main"]},
)
